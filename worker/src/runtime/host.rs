//! Facts about this host and process that workers report: memory and peak RSS.

/// Peak resident set size of this process in bytes (`VmHWM`), where the OS reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    proc_kib("/proc/self/status", "VmHWM:")
}

/// The host's physical memory in bytes (`MemTotal`).
pub fn total_memory_bytes() -> Option<u64> {
    proc_kib("/proc/meminfo", "MemTotal:")
}

/// The host's memory available to new work in bytes (`MemAvailable`).
pub fn available_memory_bytes() -> Option<u64> {
    proc_kib("/proc/meminfo", "MemAvailable:")
}

/// A `KEY: N kB` line of a /proc file, in bytes.
fn proc_kib(path: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let kib: u64 = text.lines().find(|l| l.starts_with(key))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    #[test]
    fn linux_reports_memory_and_rss() {
        if cfg!(target_os = "linux") {
            let total = super::total_memory_bytes().expect("MemTotal");
            assert!(super::available_memory_bytes().expect("MemAvailable") <= total);
            assert!(super::peak_rss_bytes().expect("VmHWM") > 0);
        }
    }
}
