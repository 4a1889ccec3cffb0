//! Device metrics in InfluxDB line protocol, from /proc (procfs crate):
//! `memory,device=<id> total=<int>,used=<int>,usedpc=<float>` and
//! `cpu,device=<id> user=<float>,system=<float>,total=<float>` (CPU shares
//! in percent over the interval since the previous sample). Integers are
//! written bare, as the reference agent did and the DMS parses, not with
//! line protocol's `i` suffix.

use procfs::{Current, CurrentSI};

/// CPU time counters of the previous sample.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuSample {
    user: u64,
    system: u64,
    idle: u64,
    total: u64,
}

/// One reading of `/proc/stat`'s CPU times, or `None` where it cannot be read.
pub fn cpu_sample() -> Option<CpuSample> {
    let stat = procfs::KernelStats::current().ok()?;
    let t = stat.total;
    let user = t.user + t.nice;
    let system = t.system + t.irq.unwrap_or(0) + t.softirq.unwrap_or(0);
    let idle = t.idle + t.iowait.unwrap_or(0);
    let total = user + system + idle + t.steal.unwrap_or(0);
    Some(CpuSample {
        user,
        system,
        idle,
        total,
    })
}

/// The metrics lines; `prev` is updated to the new CPU sample.
pub fn lines(device_id: &str, prev: &mut Option<CpuSample>) -> String {
    let tag = escape_tag(device_id);
    let mut out = String::new();
    if let Ok(m) = procfs::Meminfo::current() {
        let total = m.mem_total;
        let available = m.mem_available.unwrap_or(m.mem_free + m.cached);
        let used = total.saturating_sub(available);
        let pc = if total > 0 {
            used as f64 * 100.0 / total as f64
        } else {
            0.0
        };
        out.push_str(&format!(
            "memory,device={tag} total={total},used={used},usedpc={pc:.2}\n"
        ));
    }
    if let Some(now) = cpu_sample() {
        let base = prev.unwrap_or_default();
        let dt = now.total.saturating_sub(base.total).max(1) as f64;
        let user = now.user.saturating_sub(base.user) as f64 * 100.0 / dt;
        let system = now.system.saturating_sub(base.system) as f64 * 100.0 / dt;
        let idle = now.idle.saturating_sub(base.idle) as f64 * 100.0 / dt;
        let total = (100.0 - idle).max(0.0);
        out.push_str(&format!(
            "cpu,device={tag} user={user:.2},system={system:.2},total={total:.2}\n"
        ));
        *prev = Some(now);
    }
    out
}

/// Line protocol escapes commas, spaces and equals signs in tag values.
fn escape_tag(v: &str) -> String {
    v.replace(',', "\\,")
        .replace(' ', "\\ ")
        .replace('=', "\\=")
}

#[cfg(test)]
mod tests {
    #[test]
    fn lines_are_influx_line_protocol() {
        let mut prev = None;
        let text = super::lines("dev 1", &mut prev);
        let mem = text.lines().find(|l| l.starts_with("memory,")).unwrap();
        assert!(mem.starts_with("memory,device=dev\\ 1 total="), "{mem}");
        assert!(mem.contains(",used=") && mem.contains(",usedpc="), "{mem}");
        let cpu = text.lines().find(|l| l.starts_with("cpu,")).unwrap();
        assert!(
            cpu.contains(" user=") && cpu.contains(",system=") && cpu.contains(",total="),
            "{cpu}"
        );
        assert!(prev.is_some());
    }
}
