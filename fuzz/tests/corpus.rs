//! Replays the committed corpus through the targets' checks, without
//! libFuzzer: every input that once found new coverage still passes.

use std::path::Path;

#[test]
fn the_frame_decode_corpus_passes() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/frame_decode");
    let mut inputs = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        {
            continue;
        }
        let data = std::fs::read(&path).unwrap();
        let outcome = std::panic::catch_unwind(|| commy_fuzz::frame_decode(&data));
        assert!(outcome.is_ok(), "{} fails the checks", path.display());
        inputs += 1;
    }
    assert!(inputs >= 100, "only {inputs} inputs in {}", dir.display());
}
