//! Clocks and process figures read from the operating system.

use std::io;

/// CLOCK_MONOTONIC in microseconds; every task of this process shares it, so a receiver can
/// subtract a sender's stamp.
pub fn monotonic_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

/// Seconds since the Unix epoch (Pusher request signing).
pub fn unix_time_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Microseconds since the Unix epoch (Sentry timestamps).
pub fn unix_time_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn clock_ticks_per_s() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// utime + stime in seconds, from the text of `/proc/PID/stat`.
pub fn parse_stat_cpu_s(stat: &str, ticks_per_s: f64) -> Option<f64> {
    // The command name may hold spaces and parentheses; fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name, field 3 (state) is index 0, so utime (14) and stime (15) are 11 and 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / ticks_per_s)
}

/// VmRSS in KiB, from the text of `/proc/PID/status`.
pub fn parse_status_rss_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// CPU seconds and RSS of a set of server processes (nginx: master and worker).
#[derive(Clone, Debug, Default)]
pub struct ServerProbe {
    pids: Vec<u32>,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct ServerSample {
    pub cpu_s: f64,
    pub rss_kib: u64,
}

impl ServerProbe {
    pub fn new(pids: Vec<u32>) -> Self {
        ServerProbe { pids }
    }

    pub fn is_set(&self) -> bool {
        !self.pids.is_empty()
    }

    pub fn sample(&self) -> io::Result<ServerSample> {
        let ticks = clock_ticks_per_s();
        let mut total = ServerSample::default();
        for pid in &self.pids {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
            total.cpu_s += parse_stat_cpu_s(&stat, ticks)
                .ok_or_else(|| io::Error::other(format!("unreadable /proc/{pid}/stat")))?;
            let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
            total.rss_kib += parse_status_rss_kib(&status).unwrap_or(0);
        }
        Ok(total)
    }
}

/// This process's own CPU seconds (to show whether the client was the bottleneck).
pub fn own_cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    parse_stat_cpu_s(&stat, clock_ticks_per_s()).unwrap_or(0.0)
}

/// Machine-wide TCP segments sent (`Tcp: OutSegs` of /proc/net/snmp).
pub fn tcp_out_segs() -> Option<u64> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
    parse_out_segs(&snmp)
}

pub fn parse_out_segs(snmp: &str) -> Option<u64> {
    let mut tcp_lines = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let names = tcp_lines.next()?;
    let values = tcp_lines.next()?;
    let column = names.split_whitespace().position(|n| n == "OutSegs")?;
    values.split_whitespace().nth(column)?.parse().ok()
}

/// Raises the open-file soft limit to the hard limit; returns the limit in force.
pub fn raise_nofile_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: both calls only read or write the rlimit we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
    }
    limit.rlim_cur
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_stat_with_awkward_names() {
        let stat = "1234 (my (odd) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0";
        assert_eq!(parse_stat_cpu_s(stat, 100.0), Some(3.0));
        assert_eq!(parse_stat_cpu_s("1234 (x) S 1", 100.0), None);
        assert_eq!(parse_stat_cpu_s("garbage", 100.0), None);
    }

    #[test]
    fn parses_status_rss() {
        let status = "Name:\tx\nVmPeak:\t  9000 kB\nVmRSS:\t    4321 kB\nThreads:\t1\n";
        assert_eq!(parse_status_rss_kib(status), Some(4321));
        assert_eq!(parse_status_rss_kib("Name: x\n"), None);
    }

    #[test]
    fn parses_out_segs() {
        let snmp = "Ip: Forwarding\nIp: 1\nTcp: RtoAlgorithm InSegs OutSegs\nTcp: 1 10 42\nUdp: InDatagrams\nUdp: 3\n";
        assert_eq!(parse_out_segs(snmp), Some(42));
        assert_eq!(parse_out_segs("Udp: x\nUdp: 1\n"), None);
    }

    #[test]
    fn monotonic_clock_moves_forward() {
        let a = monotonic_us();
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert!(monotonic_us() >= a + 1_000);
    }

    #[test]
    fn own_process_is_readable() {
        let probe = ServerProbe::new(vec![std::process::id()]);
        let sample = probe.sample().unwrap();
        assert!(sample.rss_kib > 0);
    }
}
