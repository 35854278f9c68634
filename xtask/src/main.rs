//! `cargo xtask`: Commy's automation.
#![forbid(unsafe_code)]

fn main() {
    eprintln!("usage: cargo xtask <test|bench|demo>");
    std::process::exit(2);
}
