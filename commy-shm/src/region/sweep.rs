//! Sweeping: removing the region files whose TTL has passed and that no
//! process holds.

use super::*;

/// Cleans up the region directory `dir` (for example [`default_region_dir`]):
/// removes regions whose TTL has passed and that nobody holds, resets stale
/// reference counts left by holders that died, and removes temporary files
/// of creators that crashed (older than a few seconds and not locked).
/// Regions in use are never touched; other files are left alone.
pub fn sweep_regions(dir: impl AsRef<Path>) -> Result<SweepReport, SweepError> {
    let path = dir.as_ref();
    let sweep_err = |op: &'static str| {
        move |source: io::Error| SweepError::Io {
            path: path.to_owned(),
            op,
            source,
        }
    };
    let dir = RegionDir::open(path).map_err(|e| sweep_err("open")(e.into()))?;
    let mut report = SweepReport::default();
    for entry in std::fs::read_dir(path).map_err(sweep_err("read_dir"))? {
        let entry = entry.map_err(sweep_err("read_dir"))?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if name.starts_with(TEMP_PREFIX) {
            if sweep_temp_file(&dir, &entry, &name) {
                report.temp_files_removed.push(name);
            }
        } else if validate_region_name(&name).is_ok() {
            sweep_region(&dir, name, &mut report);
        }
    }
    for list in [
        &mut report.removed,
        &mut report.repaired,
        &mut report.temp_files_removed,
        &mut report.invalid,
        &mut report.skipped,
    ] {
        list.sort();
    }
    Ok(report)
}

/// Removes a crashed creator's temporary file; true if it did.
fn sweep_temp_file(dir: &RegionDir, entry: &std::fs::DirEntry, name: &str) -> bool {
    let Ok(md) = entry.metadata() else {
        return false;
    };
    let old = md
        .modified()
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age >= TEMP_GRACE);
    if !md.file_type().is_file() || !old {
        return false;
    }
    let Ok(file) = rustix::fs::openat(
        &dir.fd,
        name,
        OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY,
        Mode::empty(),
    ) else {
        return false;
    };
    // A live creator holds a lock on its temporary file.
    if rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive).is_err() {
        return false;
    }
    let Ok(st) = rustix::fs::fstat(&file) else {
        return false;
    };
    matches!(unlink_if_same(dir, name, &st, DEFAULT_TIMEOUT), Ok(true))
}

fn sweep_region(dir: &RegionDir, name: String, report: &mut SweepReport) {
    let file = match rustix::fs::openat(
        &dir.fd,
        name.as_str(),
        OFlags::RDWR | OFlags::CLOEXEC | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return,
        // A symlink, a directory, a FIFO without reader: not a region.
        Err(Errno::LOOP | Errno::ISDIR | Errno::NXIO) => return report.invalid.push(name),
        Err(_) => return report.skipped.push(name),
    };
    let Ok(st) = rustix::fs::fstat(&file) else {
        return report.skipped.push(name);
    };
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return report.invalid.push(name);
    }
    // Held by someone (or being opened right now): not ours to touch.
    if rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive).is_err() {
        return;
    }
    if !same_file(dir, &name, &st).unwrap_or(false) {
        return;
    }
    let mapped = match Mapped::map(&file) {
        Ok(mapped) => mapped,
        Err(MapError::Header(_)) => return report.invalid.push(name),
        Err(MapError::Io(..)) => return report.skipped.push(name),
    };
    let h = mapped.header();
    let now = now_ms();
    if h.refcount.load(Ordering::Relaxed) != 0 || h.last_release_ms.load(Ordering::Relaxed) > now {
        h.refcount.store(0, Ordering::Relaxed);
        h.last_release_ms.store(now, Ordering::Relaxed);
        report.repaired.push(name.clone());
    }
    if expired(h, now) && matches!(unlink_if_same(dir, &name, &st, DEFAULT_TIMEOUT), Ok(true)) {
        report.removed.push(name);
    }
}
