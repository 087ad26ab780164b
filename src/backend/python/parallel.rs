//! Model parallelism of a Python worker, from model-config.yaml: `parallelType` (`tp`, `pp`,
//! `pptp`, `custom`), `parallelLevel`, `torchrun:` and `deviceIds`, read as TorchServe reads them
//! (ModelConfig.java, Model.java, WorkerLifeCycle.java, WorkerThread.java):
//!
//! - `torchrun:` sets the level to its `nproc-per-node` (default 1); a type without a level, or a
//!   level without a type, is no parallelism.
//! - `tp`, `pp` and `pptp` start the worker under torchrun (`python -m torch.distributed.run`, the
//!   program behind the `torchrun` command, from `python_executable`'s environment) with one
//!   process per rank; rank `r` listens on the worker's socket name with the port number plus its
//!   `LOCAL_RANK`. The server connects to every rank and sends the load message to all of them;
//!   inference goes to every rank for `tp` and `pptp` (tensor parallel: each rank computes its
//!   shard) and to rank 0 alone for `pp` (rank 0 drives the pipeline), and only rank 0 answers.
//! - `custom` starts one process, as without parallelism, with the worker's GPUs visible: the
//!   handler starts its own ranks (vLLM's tensor parallelism, for example).
//! - GPUs: a worker on GPU slot `g` gets `level` consecutive ids starting at `g * level` (wrapping)
//!   of `deviceIds` (or of all GPUs) as `CUDA_VISIBLE_DEVICES`; a CPU worker gets none.
//!
//! Differences (docs/compatibility.md): malformed values are a load error, not a warning; torchrun
//! runs with `--standalone` (a free port chosen by the OS) when no `rdzv-endpoint` is given on a
//! single node, instead of c10d on the fixed port 29400; and with `--max-restarts 0`, as the pool
//! restarts the whole worker, connections included, when a rank fails.

use serde_json::Value;

/// Most ranks (processes, each typically importing torch) one worker may have: far above the GPUs
/// of any node, yet an archive cannot make one worker start thousands of processes.
pub(super) const MAX_RANKS: u32 = 64;
/// Longest torchrun string setting (`rdzv-endpoint`, ...).
const MAX_SETTING_LEN: usize = 256;

/// `parallelType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ParallelType {
    Pp,
    Tp,
    Pptp,
    Custom,
}

/// The `torchrun:` settings TorchServe reads, with its defaults.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct TorchRun {
    pub nnodes: u32,
    pub nproc_per_node: u32,
    pub rdzv_backend: String,
    pub rdzv_endpoint: Option<String>,
    pub rdzv_conf: Option<String>,
    /// `OMP_NUMBER_THREADS`, exported to the ranks as `OMP_NUM_THREADS`.
    pub omp_threads: u32,
}

impl Default for TorchRun {
    fn default() -> TorchRun {
        TorchRun {
            nnodes: 1,
            nproc_per_node: 1,
            rdzv_backend: "c10d".into(),
            rdzv_endpoint: None,
            rdzv_conf: None,
            omp_threads: 1,
        }
    }
}

/// A model's parallelism; `None` from [`Parallel::from_model_yaml`] when it has none.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Parallel {
    pub kind: ParallelType,
    /// Ranks (processes) of one worker for torchrun types; GPUs of one worker in any case.
    pub level: u32,
    pub torchrun: TorchRun,
    pub device_ids: Option<Vec<u32>>,
}

/// Most nodes and OpenMP threads a torchrun setting may name.
const MAX_COUNT: u32 = 1024;

/// Why a model-config.yaml's parallelism keys are refused; values are shown as written (JSON).
#[derive(Debug, thiserror::Error)]
pub(super) enum ParallelError {
    #[error("model-config.yaml: {key} must be a whole number from {min} to {max}, not {value}")]
    Count {
        key: String,
        min: u64,
        max: u32,
        value: Value,
    },
    #[error("model-config.yaml: torchrun.{key} must be a string of 1 to {MAX_SETTING_LEN} characters, not starting with '-', without control characters, not {value}")]
    Setting { key: String, value: Value },
    #[error("model-config.yaml: parallelType {0:?} is not one of tp, pp, pptp, custom")]
    UnknownType(String),
    #[error("model-config.yaml: parallelType must be a string, not {0}")]
    TypeNotString(Value),
    #[error("model-config.yaml: torchrun must be a mapping, not {0}")]
    TorchrunNotMapping(Value),
    #[error("model-config.yaml: unknown torchrun setting {0:?} (nnodes, nproc-per-node, rdzv-backend, rdzv-endpoint, rdzv-conf, OMP_NUMBER_THREADS)")]
    UnknownSetting(String),
    #[error("model-config.yaml: deviceIds must be GPU numbers, not {0}")]
    DeviceId(Value),
    #[error(
        "model-config.yaml: deviceIds must be a list of at most {MAX_RANKS} GPU numbers, not {0}"
    )]
    DeviceIds(Value),
}

fn count_to(key: &str, v: &Value, min: u64, max: u32) -> Result<u32, ParallelError> {
    match u32::try_from(v.as_u64().unwrap_or(u64::MAX)) {
        Ok(n) if u64::from(n) >= min && n <= max => Ok(n),
        _ => Err(ParallelError::Count {
            key: key.to_string(),
            min,
            max,
            value: v.clone(),
        }),
    }
}

/// A number of ranks.
fn count(key: &str, v: &Value, min: u64) -> Result<u32, ParallelError> {
    count_to(key, v, min, MAX_RANKS)
}

fn setting(key: &str, v: &Value) -> Result<String, ParallelError> {
    match v.as_str() {
        Some(s)
            if !s.is_empty()
                && s.len() <= MAX_SETTING_LEN
                && !s.starts_with('-')
                && !s.chars().any(char::is_control) =>
        {
            Ok(s.to_string())
        }
        _ => Err(ParallelError::Setting {
            key: key.to_string(),
            value: v.clone(),
        }),
    }
}

impl Parallel {
    /// Reads the parallelism of a model-config.yaml (as JSON); `Ok(None)` without one.
    pub fn from_model_yaml(yaml: Option<&Value>) -> Result<Option<Parallel>, ParallelError> {
        let Some(yaml) = yaml else {
            return Ok(None);
        };
        let kind = match yaml.get("parallelType") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => match s.to_ascii_lowercase().as_str() {
                "" => None,
                "pp" => Some(ParallelType::Pp),
                "tp" => Some(ParallelType::Tp),
                "pptp" => Some(ParallelType::Pptp),
                "custom" => Some(ParallelType::Custom),
                _ => return Err(ParallelError::UnknownType(s.clone())),
            },
            Some(v) => return Err(ParallelError::TypeNotString(v.clone())),
        };
        let mut level = match yaml.get("parallelLevel") {
            None | Some(Value::Null) => 0,
            Some(v) => count("parallelLevel", v, 0)?,
        };
        let mut torchrun = TorchRun::default();
        if let Some(t) = yaml.get("torchrun").filter(|t| !t.is_null()) {
            let map = t
                .as_object()
                .ok_or_else(|| ParallelError::TorchrunNotMapping(t.clone()))?;
            for (k, v) in map {
                match k.as_str() {
                    "nnodes" => torchrun.nnodes = count_to("torchrun.nnodes", v, 1, MAX_COUNT)?,
                    "nproc-per-node" => {
                        torchrun.nproc_per_node = count("torchrun.nproc-per-node", v, 1)?
                    }
                    "rdzv-backend" => torchrun.rdzv_backend = setting(k, v)?,
                    "rdzv-endpoint" => torchrun.rdzv_endpoint = Some(setting(k, v)?),
                    "rdzv-conf" => torchrun.rdzv_conf = Some(setting(k, v)?),
                    "OMP_NUMBER_THREADS" => {
                        torchrun.omp_threads =
                            count_to("torchrun.OMP_NUMBER_THREADS", v, 1, MAX_COUNT)?
                    }
                    // Read by TorchServe and never passed on; accepted for the same archives.
                    "monitor-interval" | "node-rank" | "rdzv-id" => {}
                    _ => return Err(ParallelError::UnknownSetting(k.clone())),
                }
            }
            // TorchServe: "this variable is auto calculated based on torchrun nproc-per-node".
            level = torchrun.nproc_per_node;
        }
        let device_ids = match yaml.get("deviceIds") {
            None | Some(Value::Null) => None,
            Some(Value::Array(ids)) if ids.len() <= MAX_RANKS as usize => Some(
                ids.iter()
                    .map(|v| {
                        v.as_u64()
                            .and_then(|n| u32::try_from(n).ok())
                            .ok_or_else(|| ParallelError::DeviceId(v.clone()))
                    })
                    .collect::<Result<Vec<u32>, _>>()?,
            ),
            Some(v) => return Err(ParallelError::DeviceIds(v.clone())),
        };
        let Some(kind) = kind.filter(|_| level > 0) else {
            return Ok(None);
        };
        Ok(Some(Parallel {
            kind,
            level,
            torchrun,
            device_ids,
        }))
    }

    /// Whether the worker runs under torchrun (every type but `custom`).
    pub fn uses_torchrun(&self) -> bool {
        self.kind != ParallelType::Custom
    }

    /// Processes the server connects to: one per rank under torchrun, else one.
    pub fn ranks(&self) -> u32 {
        if self.uses_torchrun() {
            self.level
        } else {
            1
        }
    }

    /// Whether inference messages go to every rank (tensor parallel), not rank 0 alone.
    pub fn broadcasts_inference(&self) -> bool {
        matches!(self.kind, ParallelType::Tp | ParallelType::Pptp)
    }

    /// torchrun's arguments before the program it runs (TorchServe's WorkerLifeCycle.attachRunner).
    pub fn torchrun_args(&self, rdzv_id: &str, log_dir: &std::path::Path) -> Vec<String> {
        let t = &self.torchrun;
        let mut args = vec![
            "-m".to_string(),
            "torch.distributed.run".to_string(),
            format!("--nnodes={}", t.nnodes),
            format!("--nproc-per-node={}", t.nproc_per_node),
            format!("--log-dir={}", log_dir.display()),
        ];
        if t.nnodes == 1 && t.rdzv_endpoint.is_none() {
            // One node, no rendezvous given: torchrun picks a free port itself (TorchServe's c10d
            // on localhost:29400 would make two such workers share one store).
            args.push("--standalone".into());
        } else {
            args.push(format!("--rdzv-backend={}", t.rdzv_backend));
            if let Some(e) = &t.rdzv_endpoint {
                args.push(format!("--rdzv-endpoint={e}"));
            }
            args.push(format!("--rdzv-id={rdzv_id}"));
        }
        if let Some(c) = &t.rdzv_conf {
            args.push(format!("--rdzv-conf={c}"));
        }
        // A rank that fails fails the worker; the pool starts a new one and connects afresh
        // (ranks torchrun restarted itself would listen on sockets nobody connects to again).
        args.push("--max-restarts=0".into());
        args
    }

    /// The GPUs of the worker on GPU slot `gpu_id` (`-1`: CPU, none) out of `gpus` GPUs, as
    /// `CUDA_VISIBLE_DEVICES` wants them; None when no GPU applies.
    pub fn visible_devices(&self, gpu_id: i32, gpus: u32) -> Option<String> {
        let slot = u32::try_from(gpu_id).ok()?;
        // deviceIds naming a GPU that is not there are ignored, as TorchServe does.
        let pool: Vec<u32> = match &self.device_ids {
            Some(ids) if !ids.is_empty() && ids.iter().all(|&i| i < gpus) => ids.clone(),
            _ => (0..gpus).collect(),
        };
        if pool.is_empty() {
            return None;
        }
        let n = pool.len() as u64;
        let take = u64::from(self.level).min(n);
        let start = u64::from(slot) * u64::from(self.level);
        let ids: Vec<String> = (0..take)
            .map(|i| pool[((start + i) % n) as usize].to_string())
            .collect();
        Some(ids.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<Option<Parallel>, ParallelError> {
        let v = crate::model::archive::parse_model_config(yaml, "model-config.yaml").unwrap();
        Parallel::from_model_yaml(Some(&v))
    }

    #[test]
    fn torchrun_sets_the_level_and_a_type_is_needed() {
        // TorchServe's test_parallelism.py model-config.yaml.
        let p =
            parse("parallelType: \"tp\"\ndeviceType: \"cpu\"\ntorchrun:\n    nproc-per-node: 4\n")
                .unwrap()
                .unwrap();
        assert_eq!(p.kind, ParallelType::Tp);
        assert_eq!(p.level, 4);
        assert_eq!(p.ranks(), 4);
        assert!(p.broadcasts_inference());
        assert!(parse("torchrun:\n  nproc-per-node: 2\n").unwrap().is_none());
        assert!(parse("parallelType: tp\n").unwrap().is_none());
        assert!(parse("minWorkers: 1\n").unwrap().is_none());
        let pp = parse("parallelType: pp\nparallelLevel: 2\n")
            .unwrap()
            .unwrap();
        assert_eq!((pp.ranks(), pp.broadcasts_inference()), (2, false));
        let custom = parse("parallelType: custom\nparallelLevel: 4\n")
            .unwrap()
            .unwrap();
        assert!(!custom.uses_torchrun());
        assert_eq!(custom.ranks(), 1);
    }

    #[test]
    fn bad_values_are_errors_naming_the_key() {
        for (yaml, key) in [
            ("parallelType: tensor\nparallelLevel: 2\n", "parallelType"),
            ("parallelType: 3\n", "parallelType"),
            ("parallelType: tp\nparallelLevel: -1\n", "parallelLevel"),
            ("parallelType: tp\nparallelLevel: 65\n", "parallelLevel"),
            (
                "parallelType: tp\ntorchrun:\n  nproc-per-node: 0\n",
                "nproc-per-node",
            ),
            (
                "parallelType: tp\ntorchrun:\n  nproc-per-node: 1000\n",
                "nproc-per-node",
            ),
            ("parallelType: tp\ntorchrun: 4\n", "torchrun"),
            (
                "parallelType: tp\ntorchrun:\n  rdzv-endpoint: \"--x\"\n",
                "rdzv-endpoint",
            ),
            (
                "parallelType: tp\ntorchrun:\n  rdzv-endpoint: \"a\\nb\"\n",
                "rdzv-endpoint",
            ),
            (
                "parallelType: tp\ntorchrun:\n  standalone: true\n",
                "standalone",
            ),
            (
                "parallelType: tp\nparallelLevel: 2\ndeviceIds: [0, -1]\n",
                "deviceIds",
            ),
            (
                "parallelType: tp\nparallelLevel: 2\ndeviceIds: 0\n",
                "deviceIds",
            ),
        ] {
            let e = parse(yaml).expect_err(yaml).to_string();
            assert!(e.contains(key), "{yaml}: {e}");
        }
    }

    #[test]
    fn torchrun_arguments() {
        let p =
            parse("parallelType: tp\ntorchrun:\n  nproc-per-node: 2\n  OMP_NUMBER_THREADS: 3\n")
                .unwrap()
                .unwrap();
        assert_eq!(p.torchrun.omp_threads, 3);
        let args = p.torchrun_args("m_9000", std::path::Path::new("/l/torchelastic_ts"));
        assert_eq!(
            args,
            [
                "-m",
                "torch.distributed.run",
                "--nnodes=1",
                "--nproc-per-node=2",
                "--log-dir=/l/torchelastic_ts",
                "--standalone",
                "--max-restarts=0"
            ]
        );
        let p = parse("parallelType: tp\ntorchrun:\n  nnodes: 2\n  nproc-per-node: 8\n  rdzv-endpoint: \"host:29400\"\n")
            .unwrap()
            .unwrap();
        let args = p.torchrun_args("m_9000", std::path::Path::new("/l"));
        assert!(
            args.contains(&"--rdzv-backend=c10d".to_string()),
            "{args:?}"
        );
        assert!(
            args.contains(&"--rdzv-endpoint=host:29400".to_string()),
            "{args:?}"
        );
        assert!(args.contains(&"--rdzv-id=m_9000".to_string()), "{args:?}");
        assert!(!args.contains(&"--standalone".to_string()), "{args:?}");
    }

    #[test]
    fn gpus_follow_device_ids() {
        let p = parse("parallelType: tp\nparallelLevel: 2\ndeviceIds: [4, 5, 6, 7]\n")
            .unwrap()
            .unwrap();
        assert_eq!(p.visible_devices(-1, 8), None);
        assert_eq!(p.visible_devices(0, 8).as_deref(), Some("4,5"));
        assert_eq!(p.visible_devices(1, 8).as_deref(), Some("6,7"));
        assert_eq!(p.visible_devices(2, 8).as_deref(), Some("4,5"));
        // deviceIds beyond the GPUs present are ignored: all GPUs are the pool.
        assert_eq!(p.visible_devices(1, 4).as_deref(), Some("2,3"));
        // More ranks than GPUs: each GPU once.
        let wide = parse("parallelType: tp\nparallelLevel: 4\n")
            .unwrap()
            .unwrap();
        assert_eq!(wide.visible_devices(0, 2).as_deref(), Some("0,1"));
        assert_eq!(wide.visible_devices(0, 0), None);
    }
}
