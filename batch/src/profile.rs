//! Profiles from an `env.toml`, laid out as the Nemotron tooling lays out its own:
//! one table per profile, `executor` saying where a step runs, and `extends` naming
//! a profile whose keys this one inherits (a key set here replaces the inherited
//! one; `env_vars` is merged name by name).
//!
//! A file users already keep holds other things too: the Nemotron launcher's
//! sections (`[wandb]`, `[artifacts]`, `[cache]`, `[cli]`) are not profiles, and a
//! profile is only read when it is used (or listed), so an unrelated profile never
//! stops a run. A profile that is used is read strictly: an unknown key, a key of
//! another executor, a value of the wrong type, a missing required key or an
//! `extends` cycle is an error naming the profile and the key.
//!
//! String values may name environment variables, as the generated Nemotron profiles
//! do: `$VAR`, `${VAR}`, `${VAR:-default}` (`$$` is a `$`). An unset variable
//! without a default is an error naming it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::mounts::{self, Mount};

/// Sections of a Nemotron env.toml that are not profiles.
pub const RESERVED: &[&str] = &["wandb", "artifacts", "cache", "cli"];

/// Where a step runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Executor {
    /// Here, in this process.
    Local,
    /// A `CheckpointConversion` for the operator, through the user's kubeconfig.
    Kubernetes,
    /// A Slurm batch job.
    Slurm,
}

impl Executor {
    /// The name used in env.toml.
    pub fn as_str(self) -> &'static str {
        match self {
            Executor::Local => "local",
            Executor::Kubernetes => "kubernetes",
            Executor::Slurm => "slurm",
        }
    }
}

/// Kubernetes settings of a profile.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Kubernetes {
    /// The namespace (default: the kubeconfig context's, else `default`).
    pub namespace: Option<String>,
    /// The kubeconfig context (default: the current one).
    pub context: Option<String>,
    /// The kubeconfig file (default: `KUBECONFIG`, else `~/.kube/config`).
    pub kubeconfig: Option<PathBuf>,
    /// Container resources: `requests` and `limits`, each resource name → quantity.
    pub resources: BTreeMap<String, BTreeMap<String, String>>,
    /// Node selector of the converter pod.
    pub node_selector: BTreeMap<String, String>,
    /// Image pull secrets.
    pub image_pull_secrets: Vec<String>,
    /// Service account of the converter pod.
    pub service_account: Option<String>,
}

/// Slurm settings of a profile.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Slurm {
    /// `--account`.
    pub account: Option<String>,
    /// `--partition`.
    pub partition: Option<String>,
    /// `--partition` for `--run` (attached), instead of `partition`.
    pub run_partition: Option<String>,
    /// `--partition` for `--batch` (detached), instead of `partition`.
    pub batch_partition: Option<String>,
    /// `--time`.
    pub time: Option<String>,
    /// `--cpus-per-task` (also the converter's `--threads` unless given).
    pub cpus_per_task: Option<u32>,
    /// `--mem`.
    pub mem: Option<String>,
    /// `--qos`.
    pub qos: Option<String>,
    /// Where batch scripts, logs and the converter's summaries go (on the shared
    /// filesystem: the job writes there and this machine reads it).
    pub job_dir: PathBuf,
    /// The converter binary as the job sees it (default: this binary, when it lies
    /// under a mount; `/ckpt-convert` in a container image).
    pub converter: Option<PathBuf>,
    /// Shell lines run before the converter (`module load …`).
    pub startup_commands: Vec<String>,
}

/// A resolved profile: its own keys over those it extends, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    /// Its name.
    pub name: String,
    /// The profiles it extends, nearest first.
    pub extends: Vec<String>,
    /// Where steps run.
    pub executor: Executor,
    /// The shared filesystem as this machine and the job see it.
    pub mounts: Vec<Mount>,
    /// The converter image (Kubernetes: the Job's image, default the operator's;
    /// Slurm: run through pyxis/enroot with `srun --container-image`).
    pub container_image: Option<String>,
    /// `HF_HOME` of the job: where model ids are looked up (its `hub` directory).
    pub hf_home: Option<PathBuf>,
    /// Extra environment of the job.
    pub env_vars: BTreeMap<String, String>,
    /// Kubernetes settings.
    pub kubernetes: Kubernetes,
    /// Slurm settings (`job_dir` empty unless the executor is Slurm).
    pub slurm: Slurm,
}

/// Which executors a key applies to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Scope {
    All,
    Remote,
    Kubernetes,
    Slurm,
}

impl Scope {
    fn allows(self, e: Executor) -> bool {
        match self {
            Scope::All => true,
            Scope::Remote => e != Executor::Local,
            Scope::Kubernetes => e == Executor::Kubernetes,
            Scope::Slurm => e == Executor::Slurm,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Scope::All => "every executor",
            Scope::Remote => "executors kubernetes and slurm",
            Scope::Kubernetes => "executor kubernetes",
            Scope::Slurm => "executor slurm",
        }
    }
}

/// Every key a profile may set, and for which executors.
const KEYS: &[(&str, Scope)] = &[
    ("executor", Scope::All),
    ("extends", Scope::All),
    ("description", Scope::All),
    ("mounts", Scope::All),
    ("hf_home", Scope::All),
    ("container_image", Scope::Remote),
    ("env_vars", Scope::All),
    ("namespace", Scope::Kubernetes),
    ("context", Scope::Kubernetes),
    ("kubeconfig", Scope::Kubernetes),
    ("resources", Scope::Kubernetes),
    ("node_selector", Scope::Kubernetes),
    ("image_pull_secrets", Scope::Kubernetes),
    ("service_account", Scope::Kubernetes),
    ("account", Scope::Slurm),
    ("partition", Scope::Slurm),
    ("run_partition", Scope::Slurm),
    ("batch_partition", Scope::Slurm),
    ("time", Scope::Slurm),
    ("cpus_per_task", Scope::Slurm),
    ("mem", Scope::Slurm),
    ("qos", Scope::Slurm),
    ("job_dir", Scope::Slurm),
    ("converter", Scope::Slurm),
    ("startup_commands", Scope::Slurm),
];

/// Keys of the Nemotron launcher's profiles that ckpt-convert does not take.
const LAUNCHER_KEYS: &[&str] = &[
    "nodes",
    "ntasks_per_node",
    "gpus_per_node",
    "nprocs_per_node",
    "nproc_per_node",
    "resource_shape",
    "node_group",
    "node_reservation",
    "shared_memory_size",
    "tunnel",
    "host",
    "user",
    "identity",
    "remote_job_dir",
    "packager",
    "pvcs",
    "pvc_nemo_run_dir",
    "nemo_run_dir",
    "base_url",
    "kube_apiserver_url",
    "client_id",
    "client_secret",
    "app_id",
    "app_secret",
    "project_name",
    "custom_spec",
    "pre_launch_commands",
    "exclusive",
    "container",
];

/// A parsed env.toml.
#[derive(Debug, Clone)]
pub struct EnvFile {
    path: PathBuf,
    table: toml::Table,
}

/// How the env.toml is found: `--env-file`, else `CKPT_ENV_FILE`, else the Nemotron
/// tooling's `NEMOTRON_ENV_FILE`, else `./env.toml`.
///
/// # Errors
/// [`Error::NoEnvFile`] saying where it looked.
pub fn locate(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_owned());
    }
    for var in ["CKPT_ENV_FILE", "NEMOTRON_ENV_FILE"] {
        if let Some(p) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            return Ok(PathBuf::from(p));
        }
    }
    let here = PathBuf::from("env.toml");
    if here.is_file() {
        return Ok(here);
    }
    Err(Error::NoEnvFile {
        looked: "no --env-file, CKPT_ENV_FILE or NEMOTRON_ENV_FILE, and no env.toml in the current directory".into(),
    })
}

impl EnvFile {
    /// Reads and parses `path` (profiles are checked when used).
    ///
    /// # Errors
    /// [`Error::EnvFile`] when it cannot be read or is not TOML.
    pub fn load(path: &Path) -> Result<EnvFile> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::EnvFile {
            path: path.to_owned(),
            why: format!("cannot read: {e}"),
        })?;
        EnvFile::parse(path, &text)
    }

    /// Parses `text`, read from `path`.
    ///
    /// # Errors
    /// [`Error::EnvFile`] when it is not TOML.
    pub fn parse(path: &Path, text: &str) -> Result<EnvFile> {
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| Error::EnvFile {
            path: path.to_owned(),
            why: format!("not valid TOML: {}", e.to_string().trim_end()),
        })?;
        Ok(EnvFile {
            path: path.to_owned(),
            table,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The profiles' names, in file order (sections that are tables and not one of
    /// [`RESERVED`]).
    pub fn names(&self) -> Vec<&str> {
        self.table
            .iter()
            .filter(|(k, v)| v.is_table() && !RESERVED.contains(&k.as_str()))
            .map(|(k, _)| k.as_str())
            .collect()
    }

    fn err(&self, profile: &str, why: impl Into<String>) -> Error {
        Error::Profile {
            file: self.path.clone(),
            profile: profile.to_owned(),
            why: why.into(),
        }
    }

    fn section(&self, name: &str) -> Option<&toml::Table> {
        if RESERVED.contains(&name) {
            return None;
        }
        self.table.get(name).and_then(toml::Value::as_table)
    }

    /// The profile `name`, resolved through its `extends` chain and checked.
    ///
    /// # Errors
    /// [`Error::Profile`] naming the profile and the key: an unknown profile (listing
    /// the known ones), an `extends` cycle or unknown parent, an unknown key, a key
    /// of another executor, a value of the wrong type, a missing required key, an
    /// unset environment variable.
    pub fn profile(&self, name: &str) -> Result<Profile> {
        let Some(_) = self.section(name) else {
            let known = self.names();
            let why = if RESERVED.contains(&name) {
                format!("[{name}] is a section of the Nemotron launcher, not a profile")
            } else if known.is_empty() {
                "no such profile; the file has none (`ckpt-convert profiles example` prints some)"
                    .into()
            } else {
                format!("no such profile; profiles: {}", known.join(", "))
            };
            return Err(self.err(name, why));
        };
        // Nearest first: name, its parent, …
        let mut chain: Vec<&str> = vec![name];
        loop {
            let current = *chain.last().expect("the chain starts with name");
            let section = self
                .section(current)
                .expect("every profile in the chain exists");
            let Some(parent) = section.get("extends") else {
                break;
            };
            let parent = parent.as_str().ok_or_else(|| {
                self.err(
                    current,
                    "extends: expected the name of a profile (a string)",
                )
            })?;
            if chain.contains(&parent) {
                let mut cycle: Vec<&str> = chain.clone();
                cycle.push(parent);
                return Err(self.err(
                    current,
                    format!(
                        "extends = \"{parent}\" makes a cycle: {}",
                        cycle.join(" → ")
                    ),
                ));
            }
            if self.section(parent).is_none() {
                return Err(self.err(
                    current,
                    format!(
                        "extends = \"{parent}\": no such profile (profiles: {})",
                        self.names().join(", ")
                    ),
                ));
            }
            chain.push(parent);
        }
        // Farthest ancestor first, so nearer profiles replace its keys.
        let mut merged: BTreeMap<String, (toml::Value, String)> = BTreeMap::new();
        for p in chain.iter().rev() {
            for (k, v) in self.section(p).expect("checked above") {
                if k == "extends" {
                    continue;
                }
                if k == "env_vars"
                    && let (Some((toml::Value::Table(old), _)), toml::Value::Table(new)) =
                        (merged.get(k), v)
                {
                    let mut both = old.clone();
                    both.extend(new.clone());
                    merged.insert(k.clone(), (toml::Value::Table(both), (*p).to_owned()));
                    continue;
                }
                merged.insert(k.clone(), (v.clone(), (*p).to_owned()));
            }
        }
        let fields = Fields {
            file: self,
            merged,
            leaf: name,
        };
        fields.build(name, chain[1..].iter().map(|s| (*s).to_owned()).collect())
    }
}

/// The merged keys of one profile, read with messages naming where each was set.
struct Fields<'a> {
    file: &'a EnvFile,
    merged: BTreeMap<String, (toml::Value, String)>,
    leaf: &'a str,
}

impl Fields<'_> {
    fn origin(&self, key: &str) -> &str {
        self.merged
            .get(key)
            .map(|(_, o)| o.as_str())
            .unwrap_or(self.leaf)
    }

    fn err(&self, key: &str, why: impl std::fmt::Display) -> Error {
        let origin = self.origin(key);
        let profile = if origin == self.leaf {
            origin.to_owned()
        } else {
            format!("{} (key {key} inherited from {origin})", self.leaf)
        };
        self.file.err(&profile, format!("{key}: {why}"))
    }

    fn string(&self, key: &str) -> Result<Option<String>> {
        match self.merged.get(key) {
            None => Ok(None),
            Some((toml::Value::String(s), _)) => {
                expand(s).map(Some).map_err(|why| self.err(key, why))
            }
            Some((other, _)) => Err(self.err(
                key,
                format!("expected a string, found {}", other.type_str()),
            )),
        }
    }

    fn path(&self, key: &str) -> Result<Option<PathBuf>> {
        let Some(s) = self.string(key)? else {
            return Ok(None);
        };
        mounts::absolute(&s)
            .map(Some)
            .map_err(|why| self.err(key, why))
    }

    fn strings(&self, key: &str) -> Result<Vec<String>> {
        match self.merged.get(key) {
            None => Ok(Vec::new()),
            Some((toml::Value::Array(items), _)) => items
                .iter()
                .map(|v| match v {
                    toml::Value::String(s) => expand(s).map_err(|why| self.err(key, why)),
                    other => Err(self.err(
                        key,
                        format!("expected a list of strings, found a {}", other.type_str()),
                    )),
                })
                .collect(),
            Some((other, _)) => Err(self.err(
                key,
                format!("expected a list of strings, found {}", other.type_str()),
            )),
        }
    }

    fn string_table(&self, key: &str) -> Result<BTreeMap<String, String>> {
        match self.merged.get(key) {
            None => Ok(BTreeMap::new()),
            Some((toml::Value::Table(t), _)) => string_table(t).map_err(|why| self.err(key, why)),
            Some((other, _)) => Err(self.err(
                key,
                format!("expected a table of strings, found {}", other.type_str()),
            )),
        }
    }

    fn build(&self, name: &str, extends: Vec<String>) -> Result<Profile> {
        let executor = match self.string("executor")?.as_deref() {
            None => {
                return Err(self
                    .file
                    .err(name, "executor is required: local, kubernetes or slurm"));
            }
            Some("local") => Executor::Local,
            Some("kubernetes") => Executor::Kubernetes,
            Some("slurm") => Executor::Slurm,
            Some(other @ ("lepton" | "dgxcloud")) => {
                return Err(self.err(
                    "executor",
                    format!(
                        "\"{other}\" is the Nemotron launcher's executor; ckpt-convert reaches Lepton and DGX Cloud through their Kubernetes API: use executor = \"kubernetes\" with the workspace's claim (`ckpt-convert profiles example` prints one)"
                    ),
                ));
            }
            Some(other) => {
                return Err(self.err(
                    "executor",
                    format!("\"{other}\": expected local, kubernetes or slurm"),
                ));
            }
        };
        for key in self.merged.keys() {
            match KEYS.iter().find(|(k, _)| k == key) {
                Some((_, scope)) if scope.allows(executor) => {}
                Some((_, scope)) => {
                    return Err(self.err(
                        key,
                        format!(
                            "applies to {}, not to executor {}",
                            scope.describe(),
                            executor.as_str()
                        ),
                    ));
                }
                None => {
                    let keys: Vec<&str> = KEYS
                        .iter()
                        .filter(|(_, s)| s.allows(executor))
                        .map(|(k, _)| *k)
                        .collect();
                    let why = if LAUNCHER_KEYS.contains(&key.as_str()) {
                        "unknown key: a setting of the Nemotron launcher that ckpt-convert does not take (the converter runs on CPUs and submits with this machine's kubeconfig or sbatch)"
                    } else {
                        "unknown key"
                    };
                    return Err(self.err(
                        key,
                        format!(
                            "{why}; keys of executor {}: {}",
                            executor.as_str(),
                            keys.join(", ")
                        ),
                    ));
                }
            }
        }
        let _ = self.string("description")?;
        let mounts = self.mounts(executor)?;
        if executor != Executor::Local && mounts.is_empty() {
            return Err(self.file.err(
                name,
                match executor {
                    Executor::Kubernetes => "mounts is required for executor kubernetes: the shared filesystem's path here and the claim that holds it, e.g. mounts = [{ path = \"/mnt/lustre-shared\", claim = \"lustre-shared\" }]",
                    _ => "mounts is required for executor slurm: the shared filesystem's path, e.g. mounts = [\"/lustre\"]",
                },
            ));
        }
        let env_vars = self.string_table("env_vars")?;
        for var in env_vars.keys() {
            if matches!(
                var.as_str(),
                "HF_HOME" | "HF_HUB_CACHE" | "CKPT_TERMINATION_LOG"
            ) {
                return Err(self.err(
                    "env_vars",
                    format!(
                        "{var} is set by ckpt-convert (use hf_home for the Hugging Face cache)"
                    ),
                ));
            }
            if !var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                || var.starts_with(|c: char| c.is_ascii_digit())
            {
                return Err(self.err("env_vars", format!("{var:?} is not a variable name")));
            }
        }
        let hf_home = self.path("hf_home")?;
        let cpus_per_task = match self.merged.get("cpus_per_task") {
            None => None,
            Some((toml::Value::Integer(n), _)) if *n >= 1 && *n <= i64::from(u32::MAX) => {
                Some(*n as u32)
            }
            Some((other, _)) => {
                return Err(self.err(
                    "cpus_per_task",
                    format!("expected an integer ≥ 1, found {other}"),
                ));
            }
        };
        let slurm = if executor == Executor::Slurm {
            let Some(job_dir) = self.path("job_dir")? else {
                return Err(self.file.err(
                    name,
                    "job_dir is required for executor slurm: a directory on the shared filesystem for batch scripts, logs and the converter's summaries",
                ));
            };
            Slurm {
                account: self.string("account")?,
                partition: self.string("partition")?,
                run_partition: self.string("run_partition")?,
                batch_partition: self.string("batch_partition")?,
                time: self.string("time")?,
                cpus_per_task,
                mem: self.string("mem")?,
                qos: self.string("qos")?,
                job_dir,
                converter: self.path("converter")?,
                startup_commands: self.strings("startup_commands")?,
            }
        } else {
            Slurm::default()
        };
        let kubernetes = Kubernetes {
            namespace: self.string("namespace")?,
            context: self.string("context")?,
            kubeconfig: self.path("kubeconfig")?,
            resources: self.resources()?,
            node_selector: self.string_table("node_selector")?,
            image_pull_secrets: self.strings("image_pull_secrets")?,
            service_account: self.string("service_account")?,
        };
        Ok(Profile {
            name: name.to_owned(),
            extends,
            executor,
            mounts,
            container_image: self.string("container_image")?,
            hf_home,
            env_vars,
            kubernetes,
            slurm,
        })
    }

    fn resources(&self) -> Result<BTreeMap<String, BTreeMap<String, String>>> {
        let key = "resources";
        let Some((value, _)) = self.merged.get(key) else {
            return Ok(BTreeMap::new());
        };
        let toml::Value::Table(t) = value else {
            return Err(self.err(
                key,
                format!("expected a table such as {{ requests = {{ cpu = \"8\", memory = \"32Gi\" }} }}, found {}", value.type_str()),
            ));
        };
        let mut out = BTreeMap::new();
        for (k, v) in t {
            if k != "requests" && k != "limits" {
                return Err(self.err(key, format!("unknown key {k}: expected requests or limits")));
            }
            let toml::Value::Table(q) = v else {
                return Err(self.err(key, format!("{k}: expected a table of quantities")));
            };
            out.insert(
                k.clone(),
                string_table(q).map_err(|why| self.err(key, format!("{k}: {why}")))?,
            );
        }
        Ok(out)
    }

    fn mounts(&self, executor: Executor) -> Result<Vec<Mount>> {
        let key = "mounts";
        let Some((value, _)) = self.merged.get(key) else {
            return Ok(Vec::new());
        };
        let toml::Value::Array(items) = value else {
            return Err(self.err(key, format!("expected a list, found {}", value.type_str())));
        };
        let mut out = Vec::new();
        for item in items {
            let m = match item {
                toml::Value::String(s) => {
                    let s = expand(s).map_err(|why| self.err(key, why))?;
                    let path = match s.split_once(':') {
                        None => s.clone(),
                        Some((host, job)) if host == job => host.to_owned(),
                        Some((host, job)) => {
                            return Err(self.err(
                                key,
                                format!("\"{s}\": {host} appears at {job} in the job; ckpt-convert passes paths unchanged, so a mount must appear at the same path (\"{host}:{host}\")"),
                            ));
                        }
                    };
                    Mount {
                        path: mounts::absolute(&path).map_err(|why| self.err(key, why))?,
                        claim: None,
                        sub_path: String::new(),
                    }
                }
                toml::Value::Table(t) => {
                    let fields = string_table(t).map_err(|why| self.err(key, why))?;
                    for k in fields.keys() {
                        if !matches!(k.as_str(), "path" | "claim" | "sub_path") {
                            return Err(self.err(
                                key,
                                format!(
                                    "unknown key {k} in a mount: expected path, claim, sub_path"
                                ),
                            ));
                        }
                    }
                    let expanded = |k: &str| -> Result<Option<String>> {
                        fields
                            .get(k)
                            .map(|v| expand(v).map_err(|why| self.err(key, why)))
                            .transpose()
                    };
                    let Some(path) = expanded("path")? else {
                        return Err(self.err(
                            key,
                            "a mount needs path (the directory as this machine sees it)",
                        ));
                    };
                    let sub_path = expanded("sub_path")?.unwrap_or_default();
                    Mount {
                        path: mounts::absolute(&path).map_err(|why| self.err(key, why))?,
                        claim: expanded("claim")?,
                        sub_path: mounts::claim_dir(&sub_path).map_err(|why| {
                            self.err(key, format!("sub_path {sub_path:?}: {why}"))
                        })?,
                    }
                }
                other => {
                    return Err(self.err(
                        key,
                        format!(
                            "expected a path or a table {{ path, claim }}, found {}",
                            other.type_str()
                        ),
                    ));
                }
            };
            match (executor, &m.claim) {
                (Executor::Kubernetes, None) => {
                    return Err(self.err(
                        key,
                        format!("{}: executor kubernetes needs the claim that holds it ({{ path = \"{}\", claim = \"NAME\" }})", m.path.display(), m.path.display()),
                    ));
                }
                (Executor::Slurm | Executor::Local, Some(c)) => {
                    return Err(self.err(
                        key,
                        format!(
                            "{}: claim = \"{c}\" applies to executor kubernetes only",
                            m.path.display()
                        ),
                    ));
                }
                _ => {}
            }
            if !m.sub_path.is_empty() && m.claim.is_none() {
                return Err(self.err(key, "sub_path applies to a claim"));
            }
            out.push(m);
        }
        Ok(out)
    }
}

fn string_table(t: &toml::Table) -> Result<BTreeMap<String, String>, String> {
    t.iter()
        .map(|(k, v)| match v {
            toml::Value::String(s) => expand(s).map(|s| (k.clone(), s)),
            other => Err(format!(
                "{k}: expected a string, found {}",
                other.type_str()
            )),
        })
        .collect()
}

/// Expands `$VAR`, `${VAR}` and `${VAR:-default}` from the environment; `$$` is `$`.
fn expand(s: &str) -> Result<String, String> {
    expand_with(s, &|v| std::env::var(v).ok())
}

fn expand_with(s: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(r) = after.strip_prefix('$') {
            out.push('$');
            rest = r;
            continue;
        }
        let (name, default, r) = if let Some(inner) = after.strip_prefix('{') {
            let end = inner
                .find('}')
                .ok_or_else(|| format!("unterminated ${{ in {s:?}"))?;
            let expr = &inner[..end];
            let (n, d) = match expr.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (expr, None),
            };
            (n, d, &inner[end + 1..])
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..end], None, &after[end..])
        };
        if name.is_empty()
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            || name.starts_with(|c: char| c.is_ascii_digit())
        {
            return Err(format!(
                "{s:?}: expected $NAME, ${{NAME}} or ${{NAME:-default}} (a literal $ is $$)"
            ));
        }
        match (env(name).filter(|v| !v.is_empty()), default) {
            (Some(v), _) => out.push_str(&v),
            (None, Some(d)) => out.push_str(d),
            (None, None) => {
                return Err(format!(
                    "the environment variable {name} is not set (in {s:?}; ${{{name}:-default}} gives a default)"
                ));
            }
        }
        rest = r;
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> EnvFile {
        EnvFile::parse(Path::new("env.toml"), text).unwrap()
    }

    fn err(f: &EnvFile, name: &str) -> String {
        f.profile(name).unwrap_err().to_string()
    }

    const BASE: &str = r#"
[wandb]
project = "nemotron"

[slurm_base]
executor = "slurm"
account = "acct"
partition = "batch"
time = "04:00:00"
mounts = ["/lustre:/lustre"]
job_dir = "/lustre/jobs"
env_vars = { A = "1", B = "2" }

[slurm_convert_model]
extends = "slurm_base"
time = "02:00:00"
env_vars = { B = "3" }

[slurm_convert_large]
extends = "slurm_convert_model"
cpus_per_task = 32
"#;

    #[test]
    fn extends_chains_inherit_and_override() {
        let f = file(BASE);
        let p = f.profile("slurm_convert_large").unwrap();
        assert_eq!(p.extends, vec!["slurm_convert_model", "slurm_base"]);
        assert_eq!(p.executor, Executor::Slurm);
        assert_eq!(p.slurm.time.as_deref(), Some("02:00:00"));
        assert_eq!(p.slurm.account.as_deref(), Some("acct"));
        assert_eq!(p.slurm.cpus_per_task, Some(32));
        assert_eq!(p.slurm.job_dir, PathBuf::from("/lustre/jobs"));
        assert_eq!(p.mounts[0].path, PathBuf::from("/lustre"));
        // env_vars merge name by name; the nearer profile wins.
        assert_eq!(
            p.env_vars,
            BTreeMap::from([("A".into(), "1".into()), ("B".into(), "3".into())])
        );
        assert_eq!(
            f.names(),
            vec!["slurm_base", "slurm_convert_model", "slurm_convert_large"]
        );
    }

    #[test]
    fn a_cycle_names_the_profiles_in_it() {
        let f = file("[a]\nextends = \"b\"\n[b]\nextends = \"c\"\n[c]\nextends = \"a\"\n");
        let e = err(&f, "a");
        assert!(
            e.contains("profile c") && e.contains("a → b → c → a"),
            "{e}"
        );
        let f = file("[a]\nextends = \"a\"\nexecutor = \"local\"\n");
        assert!(err(&f, "a").contains("a → a"));
    }

    #[test]
    fn an_unknown_parent_or_profile_is_named() {
        let f = file("[a]\nextends = \"zzz\"\n[b]\nexecutor = \"local\"\n");
        let e = err(&f, "a");
        assert!(
            e.contains("profile a") && e.contains("extends = \"zzz\""),
            "{e}"
        );
        let e = err(&f, "nope");
        assert!(
            e.contains("profile nope") && e.contains("profiles: a, b"),
            "{e}"
        );
        assert!(err(&f, "wandb").contains("not a profile"));
    }

    #[test]
    fn unknown_keys_name_the_profile_that_sets_them() {
        let f = file(&format!(
            "{BASE}\n[x]\nextends = \"slurm_base\"\ngpus_per_node = 8\n"
        ));
        let e = err(&f, "x");
        assert!(
            e.contains("profile x")
                && e.contains("gpus_per_node")
                && e.contains("Nemotron launcher"),
            "{e}"
        );
        let f = file(
            "[p]\nexecutor = \"slurm\"\nmounts = [\"/l\"]\njob_dir = \"/l/j\"\npartiton = \"x\"\n",
        );
        let e = err(&f, "p");
        assert!(
            e.contains("partiton: unknown key") && e.contains("partition"),
            "{e}"
        );
        // Set in a parent: the message says where.
        let f = file(
            "[base]\nexecutor = \"slurm\"\nnamespace = \"ns\"\n[child]\nextends = \"base\"\nmounts = [\"/l\"]\njob_dir = \"/l/j\"\n",
        );
        let e = err(&f, "child");
        assert!(
            e.contains("inherited from base")
                && e.contains("namespace: applies to executor kubernetes"),
            "{e}"
        );
    }

    #[test]
    fn missing_required_keys_are_named() {
        let f = file(
            "[k]\nexecutor = \"kubernetes\"\n[s]\nexecutor = \"slurm\"\nmounts = [\"/lustre\"]\n[n]\nmounts = []\n",
        );
        let e = err(&f, "k");
        assert!(
            e.contains("profile k") && e.contains("mounts is required"),
            "{e}"
        );
        let e = err(&f, "s");
        assert!(
            e.contains("profile s") && e.contains("job_dir is required"),
            "{e}"
        );
        let e = err(&f, "n");
        assert!(
            e.contains("profile n") && e.contains("executor is required"),
            "{e}"
        );
        let f = file("[k]\nexecutor = \"kubernetes\"\nmounts = [\"/lustre\"]\n");
        let e = err(&f, "k");
        assert!(e.contains("mounts") && e.contains("claim"), "{e}");
    }

    #[test]
    fn wrong_types_name_the_key() {
        let f =
            file("[s]\nexecutor = \"slurm\"\nmounts = [\"/l\"]\njob_dir = \"/l/j\"\ntime = 2\n");
        let e = err(&f, "s");
        assert!(e.contains("time: expected a string, found integer"), "{e}");
        let f = file("[s]\nexecutor = \"slurm\"\nmounts = [\"/l\"]\njob_dir = \"relative\"\n");
        assert!(err(&f, "s").contains("job_dir"));
        let f = file("[s]\nexecutor = \"lepton\"\n");
        assert!(err(&f, "s").contains("executor = \"kubernetes\""));
        assert!(EnvFile::parse(Path::new("env.toml"), "[a\n").is_err());
    }

    #[test]
    fn kubernetes_mounts_and_settings() {
        let f = file(
            r#"
[lepton_base]
executor = "kubernetes"
namespace = "training"
container_image = "ghcr.io/ckpt-dev/ckpt-convert:0.1.0"
mounts = [{ path = "/mnt/lustre-shared", claim = "lustre-shared" },
          { path = "/models", claim = "models", sub_path = "hf" }]
hf_home = "/mnt/lustre-shared/hf"
resources = { requests = { cpu = "8", memory = "32Gi" }, limits = { memory = "32Gi" } }
"#,
        );
        let p = f.profile("lepton_base").unwrap();
        assert_eq!(p.executor, Executor::Kubernetes);
        assert_eq!(p.mounts[1].claim.as_deref(), Some("models"));
        assert_eq!(p.mounts[1].sub_path, "hf");
        assert_eq!(p.kubernetes.resources["requests"]["cpu"], "8");
        assert_eq!(p.hf_home, Some(PathBuf::from("/mnt/lustre-shared/hf")));
    }

    #[test]
    fn variables_expand_with_defaults() {
        let env = |v: &str| (v == "SET").then(|| "value".to_owned());
        assert_eq!(
            expand_with("/a/$SET/${SET}", &env).unwrap(),
            "/a/value/value"
        );
        assert_eq!(
            expand_with("${UNSET:-/mnt/lustre-shared}/x", &env).unwrap(),
            "/mnt/lustre-shared/x"
        );
        assert_eq!(expand_with("a$$b", &env).unwrap(), "a$b");
        assert!(expand_with("$UNSET/x", &env).unwrap_err().contains("UNSET"));
        assert!(expand_with("${oops", &env).is_err());
    }
}
