//! NVIDIA GPUs through NVML, loaded at run time by nvml-wrapper: no driver, no samples, one log line.

use nvml_wrapper::Nvml;

use crate::metrics::Metrics;

/// Holds the NVML handle, if the driver could be loaded.
pub struct GpuCollector {
    nvml: Option<Nvml>,
}

/// One GPU's reading.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GpuSample {
    pub device_id: u32,
    pub utilization_percent: f64,
    /// Used over total memory (TorchServe's GPUMemoryUtilization), not memory-bus busy time.
    pub memory_percent: f64,
    pub memory_used_mb: f64,
}

impl Default for GpuCollector {
    fn default() -> Self {
        Self::new()
    }
}

impl GpuCollector {
    /// Loads NVML; says once in the log when no GPU can be used.
    pub fn new() -> GpuCollector {
        match Nvml::init() {
            Ok(nvml) => {
                let n = nvml.device_count().unwrap_or(0);
                tracing::info!("NVML loaded: {n} NVIDIA GPU(s) found");
                GpuCollector { nvml: Some(nvml) }
            }
            Err(e) => {
                tracing::info!("no NVIDIA GPU found ({e}); GPU metrics will have no samples");
                GpuCollector { nvml: None }
            }
        }
    }

    /// How many GPUs NVML sees (0 without the driver).
    pub fn device_count(&self) -> u32 {
        self.nvml
            .as_ref()
            .and_then(|n| n.device_count().ok())
            .unwrap_or(0)
    }

    /// Reads every GPU; a device that fails to answer is skipped.
    pub fn read(&self) -> Vec<GpuSample> {
        let Some(nvml) = &self.nvml else {
            return Vec::new();
        };
        let count = nvml.device_count().unwrap_or(0);
        (0..count)
            .filter_map(|i| {
                let device = nvml.device_by_index(i).ok()?;
                let util = device.utilization_rates().ok()?;
                let mem = device.memory_info().ok()?;
                let pct = if mem.total == 0 {
                    0.0
                } else {
                    mem.used as f64 * 100.0 / mem.total as f64
                };
                Some(GpuSample {
                    device_id: i,
                    utilization_percent: f64::from(util.gpu),
                    memory_percent: (pct * 100.0).round() / 100.0,
                    memory_used_mb: mem.used as f64 / (1024.0 * 1024.0),
                })
            })
            .collect()
    }

    /// Reads every GPU and records it.
    pub fn sample(&mut self, metrics: &Metrics) {
        for s in self.read() {
            let g = metrics.gpu(s.device_id);
            g.utilization.set(s.utilization_percent);
            g.memory_utilization.set(s.memory_percent);
            g.memory_used.set(s.memory_used_mb);
        }
    }
}
