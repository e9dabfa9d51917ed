//! The machine a run went on and what it cost: CPU model, memory and load from `/proc`, the
//! share of CPU time the hypervisor stole during a run, a child process's CPU time and
//! resident memory, the processors a process may run on and its sockets' UDP drops.
//!
//! Linux only, read from `/proc`; where a file is missing or unreadable the figure stays at
//! its default (0 or empty) rather than failing the run, except for [`ProcessMeter`], whose
//! callers need to know that the process is gone.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};

use crate::metrics::Machine;

/// Clock ticks per second of the times in `/proc/<pid>/stat` (`USER_HZ`). Linux reports them
/// in 1/100 s on every architecture whatever the kernel's own tick rate is.
const CLK_TCK: f64 = 100.0;

/// Describes this machine now: logical CPUs, CPU model, memory, kernel release and the
/// 1-minute load average. `steal_percent` is left 0: measure it over the run with
/// [`StealMeter`].
///
/// `cpus` is the parallelism this process may use (`std::thread::available_parallelism`,
/// which honours CPU affinity and cgroup quotas), falling back to the processors in
/// `/proc/cpuinfo`.
pub fn describe() -> Machine {
    let cpuinfo = read("/proc/cpuinfo").unwrap_or_default();
    let cpus =
        std::thread::available_parallelism().map(std::num::NonZero::get).unwrap_or_else(|_| count_processors(&cpuinfo));
    Machine {
        cpus,
        cpu_model: cpu_model(&cpuinfo).unwrap_or_else(|| "unknown".into()),
        memory_gib: read("/proc/meminfo")
            .and_then(|t| kib_field(&t, "MemTotal"))
            .map_or(0.0, |kib| kib as f64 / (1024.0 * 1024.0)),
        kernel: read("/proc/sys/kernel/osrelease").map(|t| t.trim().to_owned()).unwrap_or_default(),
        steal_percent: 0.0,
        load_average: read("/proc/loadavg").and_then(|t| load_average(&t)).unwrap_or(0.0),
    }
}

/// Share of CPU time stolen by the hypervisor since [`StealMeter::start`], from the
/// aggregate `cpu` line of `/proc/stat`.
#[derive(Clone, Copy, Debug)]
pub struct StealMeter {
    start: Option<CpuTimes>,
}

impl StealMeter {
    /// Reads the counters now.
    pub fn start() -> Self {
        Self { start: read_cpu_times() }
    }

    /// Stolen time as a percentage of all CPU time (user, nice, system, idle, iowait, irq,
    /// softirq and steal) since [`StealMeter::start`]; 0 when `/proc/stat` cannot be read or
    /// no time has passed.
    pub fn percent(&self) -> f64 {
        match (self.start, read_cpu_times()) {
            (Some(start), Some(now)) => steal_percent(start, now),
            _ => 0.0,
        }
    }
}

/// The aggregate `cpu` line's counters that matter here, in ticks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct CpuTimes {
    /// user + nice + system + idle + iowait + irq + softirq + steal. Guest time is already
    /// counted in user and nice, so the guest columns are left out.
    total: u64,
    steal: u64,
}

fn read_cpu_times() -> Option<CpuTimes> {
    read("/proc/stat").and_then(|t| parse_cpu_times(&t))
}

/// Parses the aggregate `cpu ` line of `/proc/stat`. Kernels older than 2.6.11 have no steal
/// column: missing columns count as 0.
fn parse_cpu_times(stat: &str) -> Option<CpuTimes> {
    let line = stat.lines().find(|l| l.split_whitespace().next() == Some("cpu"))?;
    let columns: Vec<u64> = line.split_whitespace().skip(1).map(str::parse).collect::<Result<_, _>>().ok()?;
    if columns.len() < 4 {
        return None;
    }
    let first8 = &columns[..columns.len().min(8)];
    Some(CpuTimes { total: first8.iter().sum(), steal: columns.get(7).copied().unwrap_or(0) })
}

fn steal_percent(start: CpuTimes, now: CpuTimes) -> f64 {
    let total = now.total.saturating_sub(start.total);
    if total == 0 {
        return 0.0;
    }
    now.steal.saturating_sub(start.steal) as f64 / total as f64 * 100.0
}

/// CPU time and resident memory of one process (a peer server the benchmark started), read
/// from `/proc/<pid>/stat` and `/proc/<pid>/status` on each call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessMeter {
    pid: u32,
}

impl ProcessMeter {
    /// A meter for process `pid` (`std::process::Child::id`).
    pub fn new(pid: u32) -> Self {
        Self { pid }
    }

    /// The process measured.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// User plus system CPU seconds the process has used so far (its own threads, not its
    /// waited-for children). Fails when the process is gone.
    pub fn cpu_seconds(&self) -> Result<f64> {
        let path = self.proc_path("stat");
        let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let (utime, stime) = parse_stat_cpu_ticks(&stat).ok_or_else(|| anyhow!("unexpected {}", path.display()))?;
        Ok((utime + stime) as f64 / CLK_TCK)
    }

    /// The process's resident set size now, in bytes. Fails when the process is gone.
    pub fn rss_bytes(&self) -> Result<u64> {
        status_rss_bytes(&self.proc_path("status"))
    }

    fn proc_path(&self, file: &str) -> PathBuf {
        PathBuf::from(proc_file(Some(self.pid), file))
    }
}

/// The processors a process may run on, as the kernel lists them (`Cpus_allowed_list` in
/// `/proc/<pid>/status`: `0-1`, `1`); `None` is this process. Empty when unreadable.
pub fn cpus_allowed(pid: Option<u32>) -> String {
    read(&proc_file(pid, "status")).and_then(|status| cpus_allowed_list(&status)).unwrap_or_default()
}

/// `/proc/<pid>/<file>`, or this process's (`/proc/self/<file>`) for `None`.
fn proc_file(pid: Option<u32>, file: &str) -> String {
    pid.map_or_else(|| format!("/proc/self/{file}"), |pid| format!("/proc/{pid}/{file}"))
}

fn cpus_allowed_list(status: &str) -> Option<String> {
    field(status, "Cpus_allowed_list").map(str::to_owned)
}

/// UDP datagrams the kernel dropped so far on the sockets process `pid` holds (the `drops`
/// column of `/proc/net/udp` and `/proc/net/udp6` for the sockets among its descriptors), so
/// that the server's drops can be told from its clients' on one host; `None` is this process.
/// 0 when unreadable.
pub fn udp_drops_of(pid: Option<u32>) -> u64 {
    let Ok(entries) = std::fs::read_dir(proc_file(pid, "fd")) else { return 0 };
    let inodes: HashSet<u64> = entries
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter_map(|target| socket_inode(&target.to_string_lossy()))
        .collect();
    ["/proc/net/udp", "/proc/net/udp6"].into_iter().filter_map(read).map(|table| udp_table_drops(&table, &inodes)).sum()
}

/// The inode of a descriptor's link target `socket:[<inode>]`.
fn socket_inode(target: &str) -> Option<u64> {
    target.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
}

/// The drops of the sockets in `inodes`, from a `/proc/net/udp` table: after its heading, one
/// line a socket whose tenth field is the inode and thirteenth the drops.
fn udp_table_drops(table: &str, inodes: &HashSet<u64>) -> u64 {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let inode: u64 = fields.get(9)?.parse().ok()?;
            if !inodes.contains(&inode) {
                return None;
            }
            fields.get(12)?.parse::<u64>().ok()
        })
        .sum()
}

/// UDP datagrams the kernel dropped so far for a full socket receive buffer, machine-wide
/// (`RcvbufErrors` in `/proc/net/snmp`); 0 when unreadable.
pub fn udp_receive_buffer_drops() -> u64 {
    let Ok(text) = std::fs::read_to_string("/proc/net/snmp") else { return 0 };
    let mut udp = text.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else { return 0 };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "RcvbufErrors")
        .and_then(|(_, value)| value.parse().ok())
        .unwrap_or(0)
}

/// The pids of this process's children (every thread's, from `/proc/self/task/*/children`).
pub fn child_pids() -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return Vec::new() };
    let mut pids: Vec<u32> = tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|text| text.split_whitespace().filter_map(|p| p.parse().ok()).collect::<Vec<u32>>())
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// This process's resident set size now, in bytes.
pub fn self_rss_bytes() -> Result<u64> {
    status_rss_bytes(Path::new(&proc_file(None, "status")))
}

fn status_rss_bytes(path: &Path) -> Result<u64> {
    let status = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let kib = kib_field(&status, "VmRSS").ok_or_else(|| anyhow!("no VmRSS in {}", path.display()))?;
    Ok(kib * 1024)
}

/// `(utime, stime)` in ticks from the text of `/proc/<pid>/stat`. The command name (field 2)
/// is in parentheses and may itself hold spaces and parentheses, so the fields are counted
/// from the LAST `)`: after it come state (field 3) ... utime (14) and stime (15).
fn parse_stat_cpu_ticks(stat: &str) -> Option<(u64, u64)> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_comm.split_whitespace().skip(11);
    let utime = fields.next()?.parse().ok()?;
    let stime = fields.next()?.parse().ok()?;
    Some((utime, stime))
}

/// The value of the first `name: value` line of a `/proc` text (`/proc/<pid>/status`,
/// `/proc/meminfo`, `/proc/cpuinfo`), trimmed.
fn field<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    text.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key.trim() == name).then(|| value.trim())
    })
}

/// A `Name:   1234 kB` figure of `/proc/meminfo` or `/proc/<pid>/status`, in KiB.
fn kib_field(text: &str, name: &str) -> Option<u64> {
    let mut words = field(text, name)?.split_whitespace();
    let value = words.next()?.parse().ok()?;
    // Both files say `kB` and mean KiB; a figure without a unit would be a count.
    matches!(words.next(), Some("kB")).then_some(value)
}

fn cpu_model(cpuinfo: &str) -> Option<String> {
    field(cpuinfo, "model name").map(str::to_owned)
}

fn count_processors(cpuinfo: &str) -> usize {
    cpuinfo.lines().filter(|l| l.split_once(':').is_some_and(|(k, _)| k.trim() == "processor")).count().max(1)
}

fn load_average(loadavg: &str) -> Option<f64> {
    loadavg.split_whitespace().next()?.parse().ok()
}

fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_allowed_processors_are_read_from_a_status_file() {
        let status = "Name:\tdownbeat\nCpus_allowed:\t2\nCpus_allowed_list:\t1\nMems_allowed_list:\t0\n";
        assert_eq!(cpus_allowed_list(status).as_deref(), Some("1"));
        assert_eq!(cpus_allowed_list("Name:\tdownbeat\n"), None);
        // This process may run somewhere.
        assert!(!cpus_allowed(None).is_empty());
    }

    #[test]
    fn a_process_s_udp_drops_are_its_own_sockets_drops() {
        let table = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  245: 00000000:14E9 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 81234 2 0000000000000000 17
  300: 0100007F:A1B2 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 81299 2 0000000000000000 5
  301: 0100007F:A1B3 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 81300 2 0000000000000000 40
";
        let mine: HashSet<u64> = [81234, 81300].into();
        assert_eq!(udp_table_drops(table, &mine), 57);
        assert_eq!(udp_table_drops(table, &HashSet::new()), 0);
        assert_eq!(socket_inode("socket:[81234]"), Some(81234));
        assert_eq!(socket_inode("pipe:[81234]"), None);
        // A socket of this process's own that nobody reads, with the smallest receive buffer:
        // loopback delivers each send at once, so all but the first few are dropped, and
        // counted as this process's.
        let before = udp_drops_of(None);
        let receiver = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).expect("a socket");
        receiver.set_recv_buffer_size(1).expect("a small receive buffer");
        receiver.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into()).expect("bound");
        let to = receiver.local_addr().expect("its address").as_socket().expect("an IP address");
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").expect("a sender");
        for _ in 0..100 {
            sender.send_to(&[0u8; 1000], to).expect("sent");
        }
        let dropped = udp_drops_of(None) - before;
        assert!((90..=100).contains(&dropped), "{dropped} of 100 dropped");
        assert_eq!(udp_drops_of(Some(u32::MAX)), 0, "no such process");
    }

    const STAT: &str = "cpu  10132153 290696 3084719 46828483 16683 0 25195 175628 0 0
cpu0 1393280 32966 572056 13343292 6130 0 17875 0 0 0
intr 1462898 0 0
ctxt 3344
";

    #[test]
    fn cpu_line_totals_the_first_eight_columns() {
        let t = parse_cpu_times(STAT).expect("cpu line");
        assert_eq!(t.total, 10132153 + 290696 + 3084719 + 46828483 + 16683 + 25195 + 175628);
        assert_eq!(t.steal, 175628);
        // `cpu0` must not be taken for the aggregate line.
        assert_eq!(parse_cpu_times("cpu0 1 2 3 4 5 6 7 8\n"), None);
        // An old kernel without steal (and guest) columns.
        assert_eq!(parse_cpu_times("cpu 1 2 3 4 5 6 7\n"), Some(CpuTimes { total: 28, steal: 0 }));
        assert_eq!(parse_cpu_times("cpu 1 x 3 4\n"), None);
    }

    #[test]
    fn steal_is_a_share_of_the_total_delta() {
        let start = CpuTimes { total: 1000, steal: 10 };
        assert!((steal_percent(start, CpuTimes { total: 1400, steal: 30 }) - 5.0).abs() < 1e-12);
        assert_eq!(steal_percent(start, start), 0.0);
    }

    #[test]
    fn stat_fields_count_from_the_last_parenthesis() {
        let plain = "4242 (node) S 1 4242 4242 0 -1 4194560 2735 0 0 0 153 47 0 0 20 0 11 0 8135 \
                     1155391488 12161 18446744073709551615 1 1 0 0 0 0 0 4096 134234626 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(parse_stat_cpu_ticks(plain), Some((153, 47)));
        // A command name with spaces and parentheses, even a `) ` that looks like the end.
        let tricky = "77 (my (odd) prog) R 3 ) S x) R 1 77 77 0 -1 4194304 10 0 0 0 1234 567 0 0 20 0 1 0 5 \
                      1000 200 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0";
        assert_eq!(parse_stat_cpu_ticks(tricky), Some((1234, 567)));
        assert_eq!(parse_stat_cpu_ticks("12 (cut) S 1 2"), None);
        assert_eq!(parse_stat_cpu_ticks("no parenthesis"), None);
    }

    #[test]
    fn status_and_meminfo_figures() {
        let status = "Name:\tnode\nVmPeak:\t 1200000 kB\nVmRSS:\t   48644 kB\nThreads:\t11\n";
        assert_eq!(kib_field(status, "VmRSS"), Some(48644));
        assert_eq!(kib_field(status, "VmSwap"), None);
        assert_eq!(kib_field(status, "Threads"), None);
        let meminfo = "MemTotal:       24576000 kB\nMemFree:         1000 kB\n";
        assert_eq!(kib_field(meminfo, "MemTotal"), Some(24576000));
    }

    #[test]
    fn cpuinfo_and_loadavg() {
        let cpuinfo = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13 64-Core Processor\n\n\
                       processor\t: 1\nmodel name\t: AMD EPYC 7B13 64-Core Processor\n";
        assert_eq!(cpu_model(cpuinfo).as_deref(), Some("AMD EPYC 7B13 64-Core Processor"));
        assert_eq!(count_processors(cpuinfo), 2);
        assert_eq!(cpu_model("processor : 0\n"), None);
        assert_eq!(load_average("1.52 0.98 0.71 2/345 6789\n"), Some(1.52));
    }

    #[test]
    fn reads_this_machine() {
        let m = describe();
        assert!(m.cpus >= 1);
        assert!(m.memory_gib > 0.0);
        assert!(!m.kernel.is_empty());
        assert!(self_rss_bytes().expect("own rss") > 0);
        let me = ProcessMeter::new(std::process::id());
        assert!(me.cpu_seconds().expect("own cpu time") >= 0.0);
        assert!(me.rss_bytes().expect("own rss") > 0);
        let steal = StealMeter::start().percent();
        assert!((0.0..=100.0).contains(&steal));
    }
}
