//! What a test reads about its own process: memory in use and where a descriptor points.

use std::collections::BTreeSet;
use std::os::fd::RawFd;
use std::os::unix::fs::MetadataExt;

/// This process's resident set size in bytes, from `/proc/self/statm`.
pub fn resident_bytes() -> Result<u64, String> {
    let statm = std::fs::read_to_string("/proc/self/statm")
        .map_err(|error| format!("/proc/self/statm: {error}"))?;
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|field| field.parse().ok())
        .ok_or(format!("unexpected /proc/self/statm: {statm:?}"))?;
    // SAFETY: `sysconf` only reads a system constant.
    let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    ensure!(page_size > 0, "sysconf(_SC_PAGESIZE) failed");
    Ok(pages * page_size as u64)
}

/// Whether `fd` is open on `/dev/null` (where a released inherited socket points).
pub fn points_at_dev_null(fd: RawFd) -> bool {
    let Ok(null) = std::fs::metadata("/dev/null") else {
        return false;
    };
    nix::sys::stat::fstat(fd)
        .is_ok_and(|stat| (stat.st_dev, stat.st_ino) == (null.dev(), null.ino()))
}

/// The thread ids of this process's threads whose name starts with `prefix` (the kernel keeps
/// the first 15 bytes of a name), from `/proc/self/task`.
pub fn threads_named(prefix: &str) -> Result<BTreeSet<u32>, String> {
    let tasks = std::fs::read_dir("/proc/self/task")
        .map_err(|error| format!("/proc/self/task: {error}"))?;
    let mut named = BTreeSet::new();
    for task in tasks.flatten() {
        // A thread that ends while we read has no `comm` any more: it no longer counts.
        let Ok(name) = std::fs::read_to_string(task.path().join("comm")) else {
            continue;
        };
        if let (true, Some(tid)) = (
            name.starts_with(prefix),
            task.file_name().to_str().and_then(|tid| tid.parse().ok()),
        ) {
            named.insert(tid);
        }
    }
    Ok(named)
}
