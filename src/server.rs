//! Start-up and shutdown: builds the registry, binds the three listeners, loads the models,
//! serves until a signal, then stops every worker.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::net::TcpListener;

use crate::api::{self, AppState};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::model::registry::{RegisterOptions, Registry};

async fn bind(what: &str, key: &str, addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for the {what} API on {addr} (config key {key})"))
}

/// Entries of `load_models`: (model name override, archive name).
fn models_to_load(config: &Config) -> Result<Vec<(Option<String>, String)>> {
    let mut out = Vec::new();
    for entry in &config.load_models {
        // TorchServe compares "ALL" without case (`--models ALL` is common in its docs).
        if entry.eq_ignore_ascii_case("all") {
            let store = config
                .model_store
                .as_ref()
                .context("load_models=all needs a model store (--model-store)")?;
            let mut names: Vec<String> = std::fs::read_dir(store)
                .with_context(|| format!("cannot read the model store {}", store.display()))?
                .filter_map(|e| e.ok())
                .filter(|e| {
                    let p = e.path();
                    p.extension().is_some_and(|x| x == "mar")
                        || p.join("MAR-INF").join("MANIFEST.json").is_file()
                })
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            out.extend(names.into_iter().map(|n| (None, n)));
        } else if let Some((name, file)) = entry.split_once('=') {
            out.push((Some(name.trim().to_string()), file.trim().to_string()));
        } else {
            out.push((None, entry.clone()));
        }
    }
    // Versions named in the `models` key with a marName are loaded too, unless already listed.
    for (name, versions) in &config.models {
        for settings in versions.values() {
            if let Some(mar) = &settings.mar_name {
                if !out.iter().any(|(_, file)| file == mar) {
                    out.push((Some(name.clone()), mar.clone()));
                }
            }
        }
    }
    Ok(out)
}

/// Runs the server until SIGINT/SIGTERM. Fails fast (before loading any model) when a listener
/// cannot be bound.
pub async fn run(mut config: Config) -> Result<()> {
    // Signal handling comes first: a SIGTERM while archives unpack must stop the server through
    // the same clean-up as later (before, the default action killed it and left the unpacked
    // archives behind).
    let mut signals = Signals::install()?;
    // TorchServe's launcher refuses a model store that is not a folder before starting anything
    // (`--model-store directory not found: X`, exit 1); without the check, every later
    // registration would fail one by one with less clear errors.
    if let Some(store) = &config.model_store {
        if !store.is_dir() {
            anyhow::bail!(
                "--model-store directory not found: {} (--model-store / model_store)",
                store.display()
            );
        }
    }
    api::http::raise_open_file_limit();
    // Folders that servers killed without a chance to clean up (SIGKILL, the OOM killer) left in
    // the temporary folder: an unpacked copy of every model per such death (src/tempdir.rs).
    let temp = std::env::temp_dir();
    let mut pids = tokio::task::spawn_blocking(move || crate::tempdir::sweep_stale(&temp))
        .await
        .unwrap_or_default();
    let folders = pids.len();
    if folders > 0 {
        pids.sort_unstable();
        pids.dedup();
        tracing::info!(
            "removed {folders} temporary folders left by oxserve processes no longer running (pids {pids:?})"
        );
    }
    // Workers are spread over the GPUs that exist, at most number_of_gpu of them (TorchServe's rule).
    // NVML is loaded once, here; the system sampler then reuses it.
    let gpus = tokio::task::spawn_blocking(crate::system::gpu::GpuCollector::new)
        .await
        .context("loading NVML")?;
    let found = gpus.device_count();
    config.number_of_gpu = Some(config.number_of_gpu.map_or(found, |n| n.min(found)));
    let config = Arc::new(config);
    let metrics = Arc::new(Metrics::from_config(&config)?);
    let registry = Arc::new(Registry::new(config.clone(), metrics.clone()));
    let tokens = api::auth::setup(&config).context("cannot write key_file.json")?;
    // Removes key_file.json on every way out of this function, errors included.
    let _key_file = KeyFile(tokens.clone());
    let state = AppState {
        registry: registry.clone(),
        metrics: metrics.clone(),
        config: config.clone(),
        tokens: tokens.clone(),
        workflows: Arc::new(crate::workflow::Workflows::new(
            config.clone(),
            registry.clone(),
        )),
    };

    let inference = bind("inference", "inference_address", config.inference_address).await?;
    let management = bind(
        "management",
        "management_address",
        config.management_address,
    )
    .await?;
    let metrics_listener = if config.enable_metrics_api {
        Some(bind("metrics", "metrics_address", config.metrics_address).await?)
    } else {
        None
    };

    let grpc_inference = bind(
        "gRPC inference",
        "grpc_inference_address/grpc_inference_port",
        config.grpc_inference_address,
    )
    .await?;
    let grpc_management = bind(
        "gRPC management",
        "grpc_management_address/grpc_management_port",
        config.grpc_management_address,
    )
    .await?;

    if !config.disable_system_metrics {
        crate::system::spawn(metrics.clone(), config.metric_time_interval, gpus);
    }

    // Key and certificate are read once, before any listener serves: a bad file stops start-up.
    let acceptor = match &config.tls {
        Some(files) => Some(api::tls::acceptor(files)?),
        None => None,
    };
    let tls_for = |on: bool| if on { acceptor.clone() } else { None };
    let scheme = |on: bool| if on { "https" } else { "http" };
    let on = config.tls_listeners;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let conf = api::http::Listener {
        limits: config.http.clone(),
        max_connections: config
            .http
            .max_connections
            .unwrap_or_else(api::http::default_max_connections),
        drain_limit: config.max_request_size,
        metrics: metrics.clone(),
        tls: None,
    };
    tracing::info!(
        "HTTP limits per listener: {} connections, head {} bytes within {} s, body pauses up to {} s, keep-alive idle {} s",
        conf.max_connections,
        conf.limits.max_header_size,
        conf.limits.header_timeout.as_secs(),
        conf.limits.body_timeout.as_secs(),
        conf.limits.keep_alive_timeout.as_secs()
    );
    let serve = |listener: TcpListener, router: axum::Router, tls: bool| {
        let mut conf = conf.clone();
        conf.tls = tls_for(tls);
        tokio::spawn(api::http::serve(listener, router, conf, stop_rx.clone()))
    };
    // TorchServe's start-up lines, which runbooks and readiness scripts grep in ts_log.log.
    tracing::info!(
        "Inference API bind to: {}://{}",
        scheme(on.inference),
        inference.local_addr()?
    );
    tracing::info!(
        "Management API bind to: {}://{}",
        scheme(on.management),
        management.local_addr()?
    );
    if let Some(l) = &metrics_listener {
        tracing::info!(
            "Metrics API bind to: {}://{}",
            scheme(on.metrics),
            l.local_addr()?
        );
    }
    let inference_addr = inference.local_addr()?;
    let mut line = format!(
        "oxserve listening: inference={} management={}",
        inference.local_addr()?,
        management.local_addr()?
    );
    let mut tasks = vec![
        serve(
            inference,
            api::inference::router(state.clone()),
            on.inference,
        ),
        serve(
            management,
            api::management::router(state.clone()),
            on.management,
        ),
    ];
    if let Some(l) = metrics_listener {
        line.push_str(&format!(" metrics={}", l.local_addr()?));
        // The dashboard lives on the metrics listener: no listener, no history to keep.
        let dashboard = config.enable_dashboard.then(|| {
            let d = Arc::new(crate::dashboard::Dashboard::new());
            d.spawn_sampler(metrics.clone());
            d
        });
        tasks.push(serve(
            l,
            api::metrics::router(state.clone(), dashboard),
            on.metrics,
        ));
    }
    line.push_str(&format!(
        " grpc_inference={} grpc_management={}",
        grpc_inference.local_addr()?,
        grpc_management.local_addr()?
    ));
    let grpc_tasks = crate::grpc::spawn(&state, grpc_inference, grpc_management, stop_rx.clone())?;
    // One parseable line on stdout: tests and scripts read the bound ports from it.
    println!("{line}");
    tracing::info!("{line}");

    let startup = async {
        if config.builtin_default_model {
            registry
                .register_demo(config.default_workers_per_model)
                .await
                .map_err(|e| anyhow::anyhow!("cannot start the demo model: {e}"))?;
            let url = format!(
                "{}://{}/predictions/demo",
                scheme(on.inference),
                inference_addr
            );
            tracing::info!(
                "serving the built-in demo model: {}",
                api::auth::first_prediction(tokens.as_deref().map(|t| t.file()), &url)
            );
            // At a terminal (`cargo run`, `oxserve start --foreground` by hand) the key itself,
            // ready to paste; stdout that is captured (systemd, docker, `oxserve start`'s log)
            // never gets it.
            if let Some(t) = tokens.as_deref() {
                if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                    println!(
                        "First prediction: {}",
                        api::auth::first_prediction_inline(t, &url)
                    );
                }
            }
        }
        // A model_snapshot in the config replaces the start-up models, as in TorchServe.
        if let Some(snap) = &config.model_snapshot {
            registry.restore(snap).await;
            return Ok(());
        }
        for (name, file) in models_to_load(&config)? {
            let options = RegisterOptions {
                model_name: name,
                loaded_at_startup: true,
                ..Default::default()
            };
            match registry.register(&file, options).await {
                Ok(v) => tracing::info!(
                    "registered model {} version {} from {file}",
                    v.name,
                    v.version
                ),
                Err(e) => tracing::error!("cannot load model {file}: {e}"),
            }
        }
        Ok::<_, anyhow::Error>(())
    };
    // A signal during start-up drops the registration in progress: its download and unpacked
    // folder are removed and its unpacking stops at the next read (model::loading).
    let outcome = tokio::select! {
        r = startup => match r {
            Ok(()) => {
                // The start-up snapshot exists before /ping turns healthy.
                registry.save_snapshot("startup");
                registry.mark_started();
                tracing::info!("Model server started.");
                let which = signals.recv().await;
                tracing::info!("{which}: shutting down: stopping listeners and workers");
                Ok(())
            }
            Err(e) => Err(e),
        },
        which = signals.recv() => {
            tracing::info!("{which} during start-up: shutting down: stopping listeners and workers");
            Ok(())
        }
    };
    let _ = stop_tx.send(true);
    // The state as it was, before shutting down unregisters every model; not when stopped during
    // start-up, whose half-restored state must not become the newest snapshot.
    if registry.is_started() {
        registry.save_snapshot("shutdown");
    }
    registry.shutdown().await;
    for t in tasks {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), t).await;
    }
    for t in grpc_tasks {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), t).await;
    }
    let m = metrics.clone();
    let _ = tokio::task::spawn_blocking(move || m.flush_log()).await;
    outcome
}

/// SIGTERM and SIGINT, listened to from the start.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }

    /// Waits for the next one; its name.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// Removes key_file.json when dropped (TorchServe removes it at shutdown).
struct KeyFile(Option<Arc<api::auth::Tokens>>);

impl Drop for KeyFile {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            t.remove_file();
        }
    }
}

/// Where `oxserve start` records the daemon's pid (`OXSERVE_PID_FILE`, else the temp folder).
pub fn pid_file() -> std::path::PathBuf {
    std::env::var_os("OXSERVE_PID_FILE")
        .map(Into::into)
        .unwrap_or_else(|| std::env::temp_dir().join(".oxserve.pid"))
}

/// Whether a process with this pid exists.
pub fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence and permission.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// Reads the recorded pid, if the file exists and names a live process.
pub fn running_pid(path: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(path).ok()?.trim().parse().ok()?;
    alive(pid).then_some(pid)
}
