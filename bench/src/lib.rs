//! What the benchmark binaries share: a process's CPU time from `/proc` and medians, the
//! fortio-style load runner and the backend it loads.

pub mod backend;
pub mod load;

/// User plus system CPU of `pid` so far, in clock ticks (100 per second on Linux).
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name: utime and stime are the 12th and 13th.
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<u64> = after
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)
}

/// Pins every thread of `pid` to `cpu` (`taskset -a`: a proxy's workers are threads of their
/// own, which `taskset -p` alone would leave free).
pub fn pin(pid: u32, cpu: u32) {
    let _ = std::process::Command::new("taskset")
        .args(["-a", "-cp", &cpu.to_string(), &pid.to_string()])
        .output();
}

/// Milliseconds in one clock tick.
pub const TICK_MS: f64 = 10.0;

/// The median of `v` (the upper one of an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// The value after `--name` on the command line, or `default`.
pub fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[cfg(test)]
mod tests {
    #[test]
    fn median_and_ticks() {
        assert_eq!(super::median(vec![3.0, 1.0, 2.0]), 2.0);
        assert!(super::cpu_ticks(std::process::id()) < u64::MAX);
        assert_eq!(super::cpu_ticks(u32::MAX), 0);
    }
}
