//! A description of the machine benchmarks ran on, and today's UTC date,
//! from `/proc`, `/sys`, `uname` and `rustc` (std only, no date crate).

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::cmd::Cmd;

/// What the benchmark report says about the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Machine {
    /// CPU model name from `/proc/cpuinfo`.
    pub(crate) cpu: String,
    /// Logical CPUs online.
    pub(crate) cores: usize,
    /// Whether the CPU flags say this is a virtual machine (`hypervisor`).
    pub(crate) virtualized: bool,
    /// Total memory, human readable.
    pub(crate) memory: String,
    /// `uname -r`.
    pub(crate) kernel: String,
    /// `rustc --version`.
    pub(crate) rustc: String,
}

const UNKNOWN: &str = "unknown";

impl Machine {
    /// Reads the description of this machine; unreadable facts say `unknown`.
    pub(crate) fn detect(root: &Path) -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let probe = |cmd: Cmd| {
            cmd.probe(root)
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| UNKNOWN.to_owned())
        };
        Machine {
            cpu: cpu_model(&cpuinfo).unwrap_or_else(|| UNKNOWN.to_owned()),
            cores: std::thread::available_parallelism().map_or(0, usize::from),
            virtualized: has_hypervisor_flag(&cpuinfo),
            memory: mem_total_kib(&meminfo)
                .map(format_kib)
                .unwrap_or_else(|| UNKNOWN.to_owned()),
            kernel: probe(Cmd::new("uname").arg("-r")),
            rustc: probe(Cmd::new("rustc").arg("--version")),
        }
    }
}

/// The first `model name` in `/proc/cpuinfo` text.
pub(crate) fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo.lines().find_map(|l| {
        let (key, value) = l.split_once(':')?;
        (key.trim() == "model name").then(|| value.trim().to_owned())
    })
}

/// Whether the first `flags` line of `/proc/cpuinfo` lists `hypervisor`.
pub(crate) fn has_hypervisor_flag(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .find_map(|l| {
            let (key, value) = l.split_once(':')?;
            (key.trim() == "flags").then_some(value)
        })
        .is_some_and(|flags| flags.split_whitespace().any(|f| f == "hypervisor"))
}

/// `MemTotal` in KiB from `/proc/meminfo` text.
pub(crate) fn mem_total_kib(meminfo: &str) -> Option<u64> {
    meminfo.lines().find_map(|l| {
        let rest = l.strip_prefix("MemTotal:")?;
        rest.trim().trim_end_matches("kB").trim().parse().ok()
    })
}

/// `24606052` KiB -> `23.5 GiB`.
pub(crate) fn format_kib(kib: u64) -> String {
    let gib = kib as f64 / (1024.0 * 1024.0);
    if gib >= 1.0 {
        format!("{gib:.1} GiB")
    } else {
        format!("{:.0} MiB", kib as f64 / 1024.0)
    }
}

/// Today's date and time in UTC, `YYYY-MM-DD HH:MM UTC`.
pub(crate) fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format_utc(secs)
}

/// Formats seconds since the Unix epoch as `YYYY-MM-DD HH:MM UTC`.
pub(crate) fn format_utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day)
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(format_utc(0), "1970-01-01 00:00 UTC");
        assert_eq!(format_utc(951_782_400), "2000-02-29 00:00 UTC");
        assert_eq!(format_utc(1_700_000_000), "2023-11-14 22:13 UTC");
        assert_eq!(format_utc(4_107_542_400), "2100-03-01 00:00 UTC");
    }

    #[test]
    fn proc_parsing() {
        let cpuinfo = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\n";
        assert_eq!(cpu_model(cpuinfo).as_deref(), Some("AMD EPYC 7B13"));
        assert_eq!(cpu_model("processor : 0\n"), None);
        assert!(has_hypervisor_flag(
            "flags\t\t: fpu vme hypervisor lahf_lm\n"
        ));
        assert!(!has_hypervisor_flag("flags\t\t: fpu vme lahf_lm\n"));
        let meminfo = "MemTotal:       24606052 kB\nMemFree:        1 kB\n";
        assert_eq!(mem_total_kib(meminfo), Some(24_606_052));
        assert_eq!(format_kib(24_606_052), "23.5 GiB");
        assert_eq!(format_kib(512 * 1024), "512 MiB");
    }

    #[test]
    fn detect_reads_this_machine() {
        let m = Machine::detect(&crate::cmd::repo_root());
        assert!(m.cores >= 1);
        assert!(m.rustc.starts_with("rustc "), "{}", m.rustc);
    }
}
