//! Host and GPU collectors: sample the machine every `metric_time_interval` into the registry.
//!
//! CPU utilisation is measured over the whole sampling interval (TorchServe measures over a
//! near-zero window, so its value is mostly 0 or 100). GPUs are read through NVML, loaded at run
//! time: on a machine without the NVIDIA driver the GPU families simply have no samples.

pub mod gpu;
pub mod host;

use std::sync::Arc;
use std::time::Duration;

use crate::metrics::Metrics;

/// Starts the sampling task: a first sample shortly after start-up, then one every `interval`.
pub fn spawn(
    metrics: Arc<Metrics>,
    interval: Duration,
    mut gpus: gpu::GpuCollector,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut host = host::HostCollector::new();
        // CPU usage needs two readings; the first window is short so start-up has a sample.
        tokio::time::sleep(Duration::from_millis(250)).await;
        loop {
            let m = metrics.clone();
            let (h, g) = tokio::task::spawn_blocking(move || {
                host.sample(&m);
                gpus.sample(&m);
                (host, gpus)
            })
            .await
            .expect("system sampling does not panic");
            host = h;
            gpus = g;
            tokio::time::sleep(interval).await;
        }
    })
}
