//! `run STEP --run|--batch PROFILE`, `status NAME` and `profiles`: a step run where
//! an env.toml profile says (`ckpt_batch`), with the parameters of a local run.
//!
//! The preflight runs here first, as a dry run with the job's Hugging Face cache,
//! so a refusal costs no queue time and reads as it does locally; the converter
//! runs it again where it runs. The report printed at the end is the converter's
//! own summary, so it reads as a local run's.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use ckpt_batch::examples::Family;
use ckpt_batch::kubernetes::{self, Cluster, Submitted};
use ckpt_batch::slurm::Share;
use ckpt_batch::{EnvFile, Executor, Profile, Request, Status, slurm};
use ckpt_convert::execute::Silent;
use ckpt_convert::pipeline::RunOptions;
use ckpt_convert::steps::{self, Params};
use ckpt_wire::{Step, Summary};

use super::args::{self, RunArgs};

/// Exit code of `status` for a run that is still queued or running.
pub const STILL_RUNNING: u8 = 3;

/// Whether these words ask for a profile (`--run` or `--batch`).
pub fn requested(words: &[String]) -> bool {
    args::parse_run(words).is_ok_and(|r| r.remote.is_some())
}

fn env_file(explicit: Option<&str>) -> Result<EnvFile> {
    let path = ckpt_batch::profile::locate(explicit.map(Path::new))?;
    Ok(EnvFile::load(&path)?)
}

/// Runs `step` where the profile of `--run`/`--batch` says.
pub fn run(step_name: &str, words: &[String]) -> Result<ExitCode> {
    let mut raw: RunArgs = args::parse_run(words)?;
    let remote = raw.remote.take().expect("requested() said so");
    let step = super::step_of(step_name)?;
    if step == Step::Validate {
        bail!(
            "convert/validate runs here, over the shared filesystem: `ckpt-convert validate PATH`"
        );
    }
    if let Some(c) = &raw.config {
        for (k, v) in super::config::parameters(c)? {
            raw.params.entry(k).or_insert(v);
        }
    }
    let file = env_file(raw.env_file.as_deref())?;
    let profile = file.profile(&remote.profile)?;
    let cwd = std::env::current_dir().context("the current directory")?;
    let mut req = Request::new(step, raw.params.clone(), &cwd);
    req.threads = raw.threads;
    req.memory_budget = raw.memory_budget.clone();
    req.overwrite = raw.overwrite;
    use_cache_of(&profile);
    if profile.executor == Executor::Local {
        // Here and now, whether attached or not: the same run as without a profile.
        let (report, json) = super::run_parsed(step, raw)?;
        super::print_outcome(&report, json)?;
        return Ok(ExitCode::SUCCESS);
    }
    preflight(&req)?;
    let outcome = match profile.executor {
        Executor::Kubernetes => kubernetes(&profile, &req, remote.attached, raw.dry_run)?,
        _ => slurm(&profile, &req, remote.attached, raw.dry_run)?,
    };
    match outcome {
        Some((name, summary)) => finish(&name, &summary, raw.json),
        None => Ok(ExitCode::SUCCESS),
    }
}

/// Model ids resolve in the job's Hugging Face cache: the preflight here looks
/// them up in the same one.
fn use_cache_of(profile: &Profile) {
    if let Some(home) = &profile.hf_home {
        // SAFETY: called from the main thread before this process starts any other
        // (no progress bar, thread pool or runtime exists yet).
        unsafe {
            std::env::set_var("HF_HOME", home);
            std::env::remove_var("HF_HUB_CACHE");
        }
    }
}

/// The step's preflight and plan, here, reading headers only.
fn preflight(req: &Request) -> Result<()> {
    // A split's parts and final step plan exactly as the whole conversion does.
    let mut whole = req.params.clone();
    whole.retain(|k, _| !ckpt_convert::pipeline::split::PARAMS.contains(&k.as_str()));
    let mut params = Params::new(req.step, whole);
    let opts = RunOptions {
        dry_run: true,
        overwrite: req.overwrite,
        ..RunOptions::default()
    };
    steps::run(req.step, &mut params, opts, &Silent)
        .context("preflight (here, before submitting)")?;
    Ok(())
}

fn kubernetes(
    profile: &Profile,
    req: &Request,
    attached: bool,
    dry_run: bool,
) -> Result<Option<(String, Summary)>> {
    let ns = kubernetes::namespace(&profile.kubernetes);
    let mut cr = kubernetes::manifest::manifest(profile, req, &ns)?;
    if dry_run {
        print!("{}", serde_yaml_ng::to_string(&cr)?);
        return Ok(None);
    }
    let cluster = Cluster::connect(&profile.kubernetes)?;
    let ns = cluster.namespace().to_owned();
    cr.metadata.namespace = Some(ns.clone());
    let name = cr
        .metadata
        .name
        .clone()
        .expect("the manifest names the resource");
    let full = format!("{ns}/{name}");
    match cluster.submit(&cr)? {
        Submitted::Created => eprintln!(
            "created CheckpointConversion {full} (profile {})",
            profile.name
        ),
        Submitted::Existing => eprintln!("{full}: the same conversion was already submitted"),
        Submitted::Retried => eprintln!("{full} had failed: raised spec.retry to run it again"),
    }
    if !attached {
        return Ok(detached(&full, profile));
    }
    let summary = cluster.follow(&ns, &name, &profile.mounts, &mut |l| {
        eprintln!("{full}: {l}")
    })?;
    Ok(Some((full, summary)))
}

fn slurm(
    profile: &Profile,
    req: &Request,
    attached: bool,
    dry_run: bool,
) -> Result<Option<(String, Summary)>> {
    let converter = slurm::converter(profile)?;
    let id = match slurm::split(req)? {
        None => {
            let script = slurm::script(profile, req, attached, &converter, &Share::Whole)?;
            if dry_run {
                print!("{script}");
                return Ok(None);
            }
            let id = slurm::submit(profile, &script)?;
            eprintln!("submitted Slurm job {id} (profile {})", profile.name);
            id
        }
        Some(n) => {
            let parts = slurm::script(profile, req, attached, &converter, &Share::Parts(n))?;
            let last = |after: &str| {
                let after = after.to_owned();
                slurm::script(
                    profile,
                    req,
                    attached,
                    &converter,
                    &Share::Finalize { after },
                )
            };
            if dry_run {
                print!("{parts}");
                println!();
                print!("{}", last("PARTS_JOB_ID")?);
                return Ok(None);
            }
            let array = slurm::submit(profile, &parts)?;
            let id = slurm::submit(profile, &last(&array)?)?;
            slurm::record_parts(profile, &id, &array, n)?;
            eprintln!(
                "submitted Slurm job array {array} ({n} parts) and job {id}, which publishes once every part succeeded (profile {})",
                profile.name
            );
            id
        }
    };
    if !attached {
        return Ok(detached(&id, profile));
    }
    let summary = slurm::follow(&profile.slurm.job_dir, &id, &mut |l| {
        eprintln!("job {id}: {l}")
    })?;
    Ok(Some((format!("job {id}"), summary)))
}

/// `--batch`: the run's name on stdout, how to follow it on stderr.
fn detached<T>(name: &str, profile: &Profile) -> Option<T> {
    println!("{name}");
    eprintln!(
        "follow it with: ckpt-convert status {name} --profile {}",
        profile.name
    );
    None
}

/// Prints a finished run's report (its exit code: 0), or returns the failure of
/// run `name` (exit code and message as the converter gave them).
fn finish(name: &str, s: &Summary, json: bool) -> Result<ExitCode> {
    if !s.succeeded() {
        return Err(ckpt_batch::Error::Failed {
            name: name.to_owned(),
            exit_code: s.exit_code.unwrap_or(1),
            message: s.error.clone().unwrap_or_else(|| "failed".into()),
        }
        .into());
    }
    let mut s = s.clone();
    if s.manifest.is_none()
        && let Some(out) = &s.output
    {
        // The output is on the shared filesystem: name its manifest when it is there.
        let m = Path::new(out).join(ckpt_convert::formats::manifest::FILE_NAME);
        if m.is_file() {
            s.manifest = Some(m.display().to_string());
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        for line in super::summary_lines(&s) {
            println!("{line}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What `status NAME` was given.
pub struct StatusArgs {
    /// A Slurm job id, or a resource as `NAMESPACE/NAME` or `NAME`.
    pub name: String,
    /// The profile it was submitted with.
    pub profile: Option<String>,
    /// The profiles file.
    pub env_file: Option<String>,
    /// Wait until it finishes.
    pub wait: bool,
    /// Print the summary as JSON.
    pub json: bool,
}

/// `status NAME`: where a submitted run stands; its report once it finished.
pub fn status(a: &StatusArgs) -> Result<ExitCode> {
    let profile = match &a.profile {
        Some(p) => Some(env_file(a.env_file.as_deref())?.profile(p)?),
        None => None,
    };
    let executor = match &profile {
        Some(p) => p.executor,
        None if !a.name.is_empty() && a.name.chars().all(|c| c.is_ascii_digit()) => Executor::Slurm,
        None => Executor::Kubernetes,
    };
    let name = a.name.as_str();
    let (run, summary) = match executor {
        Executor::Local => bail!(
            "profile {} runs steps here, in the foreground: there is no job to follow",
            a.profile.as_deref().unwrap_or_default()
        ),
        Executor::Kubernetes => {
            let k = profile
                .as_ref()
                .map(|p| p.kubernetes.clone())
                .unwrap_or_default();
            let mounts = profile
                .as_ref()
                .map(|p| p.mounts.clone())
                .unwrap_or_default();
            let cluster = Cluster::connect(&k)?;
            let (ns, n) = match name.split_once('/') {
                Some((ns, n)) => (ns.to_owned(), n.to_owned()),
                None => (cluster.namespace().to_owned(), name.to_owned()),
            };
            let full = format!("{ns}/{n}");
            let s = if a.wait {
                cluster.follow(&ns, &n, &mounts, &mut |l| eprintln!("{full}: {l}"))?
            } else {
                match cluster.status(&ns, &n, &mounts)? {
                    Status::Active(l) => {
                        println!("{full}: {l}");
                        return Ok(ExitCode::from(STILL_RUNNING));
                    }
                    Status::Finished(s) => *s,
                }
            };
            (full, s)
        }
        Executor::Slurm => {
            if !name.chars().all(|c| c.is_ascii_digit()) || name.is_empty() {
                bail!("{name:?}: a Slurm job is named by its id (the number --batch printed)");
            }
            let dir = match &profile {
                Some(p) => p.slurm.job_dir.clone(),
                None => slurm::job_dir_of(name)?,
            };
            let s = if a.wait {
                slurm::follow(&dir, name, &mut |l| eprintln!("job {name}: {l}"))?
            } else {
                match slurm::status(&dir, name)? {
                    Status::Active(l) => {
                        println!("job {name}: {l}");
                        return Ok(ExitCode::from(STILL_RUNNING));
                    }
                    Status::Finished(s) => *s,
                }
            };
            (format!("job {name}"), s)
        }
    };
    finish(&run, &summary, a.json)
}

/// `profiles`: every profile of the file, with where it runs (or what is wrong).
pub fn list(env: Option<&str>) -> Result<ExitCode> {
    let file = env_file(env)?;
    println!("{}:", file.path().display());
    let names = file.names();
    if names.is_empty() {
        println!("  no profiles (`ckpt-convert profiles example` prints some)");
    }
    for name in names {
        match file.profile(name) {
            Ok(p) => println!("  {name:<28} {:<11} {}", p.executor.as_str(), place(&p)),
            Err(e) => println!("  {name:<28} error: {e}"),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Where a profile runs, in a few words.
fn place(p: &Profile) -> String {
    let mounts = ckpt_batch::mounts::describe(&p.mounts);
    match p.executor {
        Executor::Local => "here".into(),
        Executor::Kubernetes => format!(
            "namespace {}; {mounts}",
            kubernetes::namespace(&p.kubernetes)
        ),
        Executor::Slurm => format!(
            "partition {}; {mounts}; jobs in {}",
            p.slurm.partition.as_deref().unwrap_or("(default)"),
            p.slurm.job_dir.display()
        ),
    }
}

/// `profiles show NAME`: the profile as resolved.
pub fn show(env: Option<&str>, name: &str) -> Result<ExitCode> {
    let p = env_file(env)?.profile(name)?;
    println!("{name}: executor {}", p.executor.as_str());
    if !p.extends.is_empty() {
        println!("  extends: {}", p.extends.join(" → "));
    }
    println!("  runs: {}", place(&p));
    if let Some(i) = &p.container_image {
        println!("  container_image: {i}");
    }
    if let Some(h) = &p.hf_home {
        println!("  hf_home: {}", h.display());
    }
    for (k, v) in &p.env_vars {
        println!("  env {k}={v}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `profiles example [FAMILY]`: example profiles to start an env.toml from.
pub fn example(family: Option<&str>) -> Result<ExitCode> {
    let families: Vec<Family> = match family {
        None => Family::ALL.to_vec(),
        Some(f) => vec![
            Family::from_name(f)
                .with_context(|| format!("{f:?}: expected one of lepton, dgxcloud, slurm"))?,
        ],
    };
    println!("# ckpt-convert profiles: save as env.toml (or point CKPT_ENV_FILE at it) and edit.");
    for f in families {
        println!();
        print!("{}", f.text());
    }
    Ok(ExitCode::SUCCESS)
}
