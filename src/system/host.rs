//! Host CPU, memory and disk, through sysinfo.

use std::path::Path;

use sysinfo::{Disks, MemoryRefreshKind, System};

use crate::metrics::families as f;
use crate::metrics::Metrics;

/// Keeps the previous CPU reading, so each sample covers the interval since the last one.
pub struct HostCollector {
    system: System,
    disks: Disks,
}

/// One reading of the host, in TorchServe's units.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HostSample {
    pub cpu_percent: f64,
    pub memory_used_mb: f64,
    pub memory_available_mb: f64,
    pub memory_percent: f64,
    pub disk_used_gb: f64,
    pub disk_available_gb: f64,
    pub disk_percent: f64,
}

impl Default for HostCollector {
    fn default() -> Self {
        Self::new()
    }
}

impl HostCollector {
    pub fn new() -> HostCollector {
        let mut system = System::new();
        system.refresh_cpu_usage();
        HostCollector {
            system,
            disks: Disks::new_with_refreshed_list(),
        }
    }

    /// Reads the host now. CPU is the average since the previous call.
    pub fn read(&mut self) -> HostSample {
        self.system.refresh_cpu_usage();
        self.system
            .refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
        self.disks.refresh(true);
        let mb = |b: u64| b as f64 / (1024.0 * 1024.0);
        let gb = |b: u64| b as f64 / (1024.0 * 1024.0 * 1024.0);
        let total = self.system.total_memory();
        let available = self.system.available_memory();
        let used = total.saturating_sub(available);
        // The disk holding "/" (what TorchServe reports), else the largest one.
        let root = self
            .disks
            .list()
            .iter()
            .filter(|d| d.mount_point() == Path::new("/"))
            .chain(self.disks.list().iter())
            .max_by_key(|d| (d.mount_point() == Path::new("/"), d.total_space()));
        let (disk_total, disk_avail) = root
            .map(|d| (d.total_space(), d.available_space()))
            .unwrap_or((0, 0));
        let disk_used = disk_total.saturating_sub(disk_avail);
        let pct = |part: u64, whole: u64| {
            if whole == 0 {
                0.0
            } else {
                round2(part as f64 * 100.0 / whole as f64)
            }
        };
        HostSample {
            cpu_percent: round2(f64::from(self.system.global_cpu_usage()).clamp(0.0, 100.0)),
            memory_used_mb: round2(mb(used)),
            memory_available_mb: round2(mb(available)),
            memory_percent: pct(used, total),
            disk_used_gb: round2(gb(disk_used)),
            disk_available_gb: round2(gb(disk_avail)),
            disk_percent: pct(disk_used, disk_total),
        }
    }

    /// Reads the host and records it.
    pub fn sample(&mut self, metrics: &Metrics) {
        let s = self.read();
        // Series appear with the first sample (none at all with disable_system_metrics).
        for (name, value) in [
            (f::CPU_UTILIZATION, s.cpu_percent),
            (f::MEMORY_USED, s.memory_used_mb),
            (f::MEMORY_AVAILABLE, s.memory_available_mb),
            (f::MEMORY_UTILIZATION, s.memory_percent),
            (f::DISK_USAGE, s.disk_used_gb),
            (f::DISK_AVAILABLE, s.disk_available_gb),
            (f::DISK_UTILIZATION, s.disk_percent),
        ] {
            metrics.ts(name, &[]).set(value);
        }
    }
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_are_plausible() {
        let mut c = HostCollector::new();
        std::thread::sleep(std::time::Duration::from_millis(300));
        let s = c.read();
        assert!((0.0..=100.0).contains(&s.cpu_percent));
        assert!((0.0..=100.0).contains(&s.memory_percent));
        assert!(s.memory_used_mb > 0.0 && s.memory_available_mb > 0.0);
        assert!(s.disk_used_gb > 0.0 && (0.0..=100.0).contains(&s.disk_percent));
    }
}
