//! The Slurm executor: a batch script that runs the converter on the shared
//! filesystem (or in the profile's image through pyxis/enroot), submitted with
//! `sbatch --parsable`, followed with `squeue` (then `sacct`, or `scontrol` where
//! accounting is off), and read back from the job directory the profile names:
//!
//! | file | written by |
//! |---|---|
//! | `<id>.sbatch` | this command, after submitting: the script as submitted |
//! | `<id>.out` | Slurm: the job's output and errors |
//! | `<id>.summary.json` | the converter (`CKPT_TERMINATION_LOG`): its [`Summary`] |
//! | `<id>.exit` | the script: the converter's exit code |
//!
//! The job sees only the environment the script sets (`--export=NONE`): the
//! profile's `hf_home` and `env_vars`, so a run does not depend on the shell it
//! was submitted from.
//!
//! A conversion asked for with `workers=N` (and neither `part` nor `finalize`)
//! is split ([`Share`]): a job array of N parts (`part=$SLURM_ARRAY_TASK_ID`),
//! then a final job (`finalize=true`) that Slurm starts once every part
//! succeeded (`--dependency=afterok`) and cancels if one failed
//! (`--kill-on-invalid-dep=yes`). The final job is the run that `status`
//! follows; `<id>.parts` in the job directory names its parts' array job, so
//! status can say how far they are.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ckpt_wire::Summary;

use crate::Status;
use crate::error::{Error, Result};
use crate::mounts;
use crate::profile::Profile;
use crate::request::Request;

/// The converter inside the images `converter/Dockerfile` builds.
pub const IMAGE_CONVERTER: &str = "/ckpt-convert";

/// Job states after which a job does nothing more.
const ENDED: &[&str] = &[
    "BOOT_FAIL",
    "CANCELLED",
    "COMPLETED",
    "DEADLINE",
    "FAILED",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "TIMEOUT",
    "SPECIAL_EXIT",
];

/// Which job of a run a script is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Share {
    /// The whole conversion in one job.
    Whole,
    /// The array of the `N` parts of a split run.
    Parts(u64),
    /// The final step of a split run, after the parts' array job `after`.
    Finalize {
        /// The parts' array job id.
        after: String,
    },
}

/// The number of parts to run as an array: `Some(N)` for a request with
/// `workers=N` and neither `part` nor `finalize` (one of those runs that one
/// share alone, as a single job).
///
/// # Errors
/// [`Error::Param`] when `workers` is not a positive integer.
pub fn split(req: &Request) -> Result<Option<u64>> {
    let Some(w) = req.params.get("workers") else {
        return Ok(None);
    };
    let n = w
        .trim()
        .parse::<u64>()
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| Error::Param {
            param: "workers".into(),
            value: w.clone(),
            why: "expected a positive integer: the number of parts".into(),
        })?;
    let alone = req.params.contains_key("part") || req.params.contains_key("finalize");
    Ok((!alone).then_some(n))
}

/// `'…'` for the shell.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn under_mount(profile: &Profile, param: &str, path: &Path) -> Result<()> {
    if mounts::locate(&profile.mounts, path).is_some() {
        return Ok(());
    }
    Err(Error::Param {
        param: param.to_owned(),
        value: path.display().to_string(),
        why: format!(
            "outside every mount of profile {}: {} (the job reads and writes paths as they are, on the shared filesystem)",
            profile.name,
            mounts::describe(&profile.mounts)
        ),
    })
}

/// The converter the job runs: `/ckpt-convert` in the profile's image; else the
/// profile's `converter`; else this binary when it lies under a mount.
///
/// # Errors
/// [`Error::Param`] when the binary is not on the shared filesystem.
pub fn converter(profile: &Profile) -> Result<PathBuf> {
    if let Some(c) = &profile.slurm.converter {
        if profile.container_image.is_none() {
            under_mount(profile, "converter", c)?;
        }
        return Ok(c.clone());
    }
    if profile.container_image.is_some() {
        return Ok(PathBuf::from(IMAGE_CONVERTER));
    }
    let exe =
        std::env::current_exe().map_err(|e| Error::Submit(format!("finding this binary: {e}")))?;
    under_mount(profile, "converter", &exe).map_err(|_| Error::Param {
        param: "converter".into(),
        value: exe.display().to_string(),
        why: format!(
            "this binary is not on the shared filesystem ({}): set converter in profile {} to the converter's path there, or container_image to run it from an image",
            mounts::describe(&profile.mounts),
            profile.name
        ),
    })?;
    Ok(exe)
}

/// The batch script for `share` of `req` (`attached`: submitted by `--run`).
///
/// # Errors
/// [`Error::Param`] for a path or the job directory outside every mount.
pub fn script(
    profile: &Profile,
    req: &Request,
    attached: bool,
    converter: &Path,
    share: &Share,
) -> Result<String> {
    if req.step == ckpt_wire::Step::Validate {
        return Err(Error::Param {
            param: "step".into(),
            value: req.step.name().into(),
            why: "validation runs here, over the shared filesystem: `ckpt-convert validate PATH`"
                .into(),
        });
    }
    for (k, v) in req.paths() {
        under_mount(profile, k, Path::new(v))?;
    }
    let s = &profile.slurm;
    under_mount(profile, "job_dir", &s.job_dir)?;
    if let Some(h) = &profile.hf_home {
        under_mount(profile, "hf_home", h)?;
    }
    let dir = s.job_dir.display().to_string();
    let mut req = req.clone();
    if req.threads.is_none() {
        req.threads = s.cpus_per_task.map(|n| n as usize);
    }
    let target = [
        "hf_path",
        "megatron_path",
        "output_hf_path",
        "output_megatron_path",
    ]
    .iter()
    .find_map(|k| req.params.get(*k))
    .and_then(|p| {
        Path::new(p)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
    })
    .unwrap_or_default();
    let mut name = format!(
        "ckpt-{}",
        req.step
            .name()
            .trim_start_matches("convert/")
            .replace('_', "-")
    );
    if !target.is_empty() {
        name.push('-');
        name.push_str(&target);
    }
    match share {
        Share::Whole => {}
        Share::Parts(_) => name.push_str("-parts"),
        Share::Finalize { .. } => name.push_str("-finalize"),
    }
    let mut lines = vec![
        "#!/bin/bash".to_owned(),
        format!("# ckpt-convert {} (profile {})", req.step, profile.name),
        format!(
            "#SBATCH --job-name={}",
            name.replace(char::is_whitespace, "_")
        ),
        format!("#SBATCH --output={dir}/%j.out"),
        format!("#SBATCH --chdir={dir}"),
        "#SBATCH --nodes=1".into(),
        "#SBATCH --ntasks=1".into(),
        "#SBATCH --export=NONE".into(),
    ];
    match share {
        Share::Whole => {}
        // Each task is a job of its own (`%j`, `$SLURM_JOB_ID`): one log, summary
        // and exit file per part.
        Share::Parts(n) => lines.push(format!("#SBATCH --array=0-{}", n.saturating_sub(1))),
        Share::Finalize { after } => {
            lines.push(format!("#SBATCH --dependency=afterok:{after}"));
            // A failed part makes the dependency one that never holds: the final
            // job then ends instead of waiting for ever.
            lines.push("#SBATCH --kill-on-invalid-dep=yes".into());
        }
    }
    let partition = if attached {
        s.run_partition.as_ref().or(s.partition.as_ref())
    } else {
        s.batch_partition.as_ref().or(s.partition.as_ref())
    };
    for (flag, value) in [
        ("account", s.account.clone()),
        ("partition", partition.cloned()),
        ("time", s.time.clone()),
        ("cpus-per-task", s.cpus_per_task.map(|n| n.to_string())),
        ("mem", s.mem.clone()),
        ("qos", s.qos.clone()),
    ] {
        if let Some(v) = value {
            lines.push(format!("#SBATCH --{flag}={v}"));
        }
    }
    lines.push("set -u".into());
    lines.push(format!(
        "export CKPT_TERMINATION_LOG={}/\"$SLURM_JOB_ID\".summary.json",
        quote(&dir)
    ));
    if let Some(h) = &profile.hf_home {
        lines.push(format!(
            "export HF_HOME={}",
            quote(&h.display().to_string())
        ));
    }
    for (k, v) in &profile.env_vars {
        lines.push(format!("export {k}={}", quote(v)));
    }
    lines.extend(s.startup_commands.iter().cloned());
    let mut command: Vec<String> = Vec::new();
    if let Some(image) = &profile.container_image {
        let binds: Vec<String> = profile
            .mounts
            .iter()
            .map(|m| format!("{0}:{0}", m.path.display()))
            .collect();
        // The step takes the script's environment: under `--export=NONE` srun
        // would otherwise pass on nothing the script exported.
        command.extend([
            "srun".to_owned(),
            "--ntasks=1".to_owned(),
            "--export=ALL".to_owned(),
            format!("--container-image={}", quote(image)),
            format!("--container-mounts={}", quote(&binds.join(","))),
        ]);
    }
    command.push(quote(&converter.display().to_string()));
    command.extend(req.args().iter().map(|a| quote(a)));
    match share {
        Share::Whole => {}
        Share::Parts(_) => command.push("\"part=$SLURM_ARRAY_TASK_ID\"".into()),
        Share::Finalize { .. } => command.push(quote("finalize=true")),
    }
    lines.push(command.join(" "));
    lines.push("code=$?".into());
    lines.push(format!(
        "printf '%s\\n' \"$code\" > {}/\"$SLURM_JOB_ID\".exit",
        quote(&dir)
    ));
    lines.push("exit \"$code\"".into());
    Ok(lines.join("\n") + "\n")
}

fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<std::process::Output> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| {
        Error::Submit(format!(
            "{program}: {e} (is this a Slurm submit host? Debian: apt-get install slurm-client)"
        ))
    })?;
    if let Some(text) = stdin {
        use std::io::Write;
        let mut pipe = child.stdin.take().expect("stdin is piped");
        pipe.write_all(text.as_bytes())
            .map_err(|e| Error::Submit(format!("{program}: writing its input: {e}")))?;
    }
    child
        .wait_with_output()
        .map_err(|e| Error::Submit(format!("{program}: {e}")))
}

/// Submits `script` with `sbatch --parsable`; returns the job id and keeps a copy
/// of the script as `<job_dir>/<id>.sbatch`.
///
/// # Errors
/// [`Error::Submit`] with sbatch's message when it refuses.
pub fn submit(profile: &Profile, script: &str) -> Result<String> {
    let dir = &profile.slurm.job_dir;
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::Submit(format!("job_dir {}: {e}", dir.display())))?;
    let out = run("sbatch", &["--parsable"], Some(script))?;
    if !out.status.success() {
        return Err(Error::Submit(format!(
            "sbatch refused the job: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // `ID` or `ID;CLUSTER`.
    let id = text.trim().split(';').next().unwrap_or_default().to_owned();
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
        return Err(Error::Submit(format!(
            "sbatch printed {text:?}, not a job id"
        )));
    }
    let copy = dir.join(format!("{id}.sbatch"));
    std::fs::write(&copy, script)
        .map_err(|e| Error::Submit(format!("job {id} submitted, but {}: {e}", copy.display())))?;
    Ok(id)
}

/// Records that final job `id` runs after the `workers` parts of array job
/// `parts` (`<job_dir>/<id>.parts`), for [`status`].
///
/// # Errors
/// [`Error::Submit`] when the file cannot be written.
pub fn record_parts(profile: &Profile, id: &str, parts: &str, workers: u64) -> Result<()> {
    let path = profile.slurm.job_dir.join(format!("{id}.parts"));
    std::fs::write(&path, format!("{parts} {workers}\n")).map_err(|e| {
        Error::Submit(format!(
            "jobs {parts} and {id} submitted, but {}: {e}",
            path.display()
        ))
    })
}

/// The parts' array job and their number, when `id` is a split run's final job.
fn parts_of(job_dir: &Path, id: &str) -> Option<(String, u64)> {
    let text = std::fs::read_to_string(job_dir.join(format!("{id}.parts"))).ok()?;
    let mut words = text.split_whitespace();
    let array = words.next()?.to_owned();
    let n = words.next()?.parse().ok()?;
    Some((array, n))
}

/// Tasks an `ArrayTaskId` names: `3`, `0-7`, `1,4-5`, each with an optional
/// `%LIMIT`.
fn tasks_in(ids: &str) -> u64 {
    let ids = ids.split('%').next().unwrap_or_default();
    ids.split(',')
        .map(|r| match r.split_once('-') {
            Some((a, b)) => match (a.parse::<u64>(), b.parse::<u64>()) {
                (Ok(a), Ok(b)) if b >= a => b - a + 1,
                _ => 1,
            },
            None => 1,
        })
        .sum()
}

/// How far the parts of array job `array` are, from the controller while it
/// remembers them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Parts {
    done: u64,
    running: u64,
    failed: u64,
}

impl Parts {
    /// `parts job 41: 2/4 parts done, 1 running, 1 failed`.
    fn line(&self, array: &str, n: u64) -> String {
        let mut line = format!("parts job {array}: {}/{n} parts done", self.done);
        if self.running > 0 {
            line.push_str(&format!(", {} running", self.running));
        }
        if self.failed > 0 {
            line.push_str(&format!(", {} failed", self.failed));
        }
        line
    }
}

fn parts_progress(array: &str) -> Option<Parts> {
    let out = run("scontrol", &["show", "job", array, "-o"], None).ok()?;
    if !out.status.success() {
        return None;
    }
    let (mut done, mut running, mut failed) = (0, 0, 0);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(k)?.strip_prefix('='))
        };
        let tasks = field("ArrayTaskId").map_or(1, tasks_in);
        match field("JobState").unwrap_or_default() {
            "COMPLETED" => done += tasks,
            "RUNNING" | "COMPLETING" => running += tasks,
            "PENDING" | "CONFIGURING" | "REQUEUED" | "SUSPENDED" => {}
            _ => failed += tasks,
        }
    }
    Some(Parts {
        done,
        running,
        failed,
    })
}

/// `(state, reason)` from `squeue`; `None` once Slurm no longer lists the job.
fn queued(id: &str) -> Result<Option<(String, String)>> {
    let out = run(
        "squeue",
        &["-h", "-t", "all", "-j", id, "-o", "%T|%r"],
        None,
    )?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        if stderr.contains("Invalid job id") {
            return Ok(None);
        }
        return Err(Error::Follow(format!("squeue -j {id}: {}", stderr.trim())));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.lines().next().and_then(|l| {
        let (state, reason) = l.trim().split_once('|')?;
        Some((state.to_owned(), reason.to_owned()))
    }))
}

/// `(state, exit code)` of an ended job: from accounting (`sacct`), else from the
/// controller while it still remembers the job (`scontrol`).
fn ended_state(id: &str) -> Option<(String, String)> {
    if let Ok(out) = run(
        "sacct",
        &["-n", "-X", "-P", "-j", id, "-o", "State,ExitCode"],
        None,
    ) && out.status.success()
        && let Some((state, code)) = String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .and_then(|l| {
                l.trim()
                    .split_once('|')
                    .map(|(a, b)| (a.to_owned(), b.to_owned()))
            })
    {
        return Some((state, code));
    }
    let fields = scontrol(id)?;
    let get = |k: &str| fields.iter().find_map(|(f, v)| (f == k).then(|| v.clone()));
    Some((get("JobState")?, get("ExitCode").unwrap_or_default()))
}

/// `scontrol show job ID -o` as fields.
fn scontrol(id: &str) -> Option<Vec<(String, String)>> {
    let out = run("scontrol", &["show", "job", id, "-o"], None).ok()?;
    if !out.status.success() {
        return None;
    }
    Some(
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|w| w.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
            .collect(),
    )
}

/// The job directory of a job Slurm still remembers (its output file's directory).
///
/// # Errors
/// [`Error::Follow`] when Slurm no longer knows the job.
pub fn job_dir_of(id: &str) -> Result<PathBuf> {
    scontrol(id)
        .and_then(|f| f.into_iter().find(|(k, _)| k == "StdOut").map(|(_, v)| v))
        .and_then(|out| Path::new(&out).parent().map(Path::to_owned))
        .ok_or_else(|| {
            Error::Follow(format!(
                "Slurm no longer knows job {id}: give --profile PROFILE so its job_dir can be read"
            ))
        })
}

/// Where job `id` stands; once it ended, the converter's summary from `job_dir`.
///
/// # Errors
/// [`Error::Follow`] when `squeue` fails.
pub fn status(job_dir: &Path, id: &str) -> Result<Status> {
    let q = queued(id)?;
    let parts = parts_of(job_dir, id);
    if let Some((state, reason)) = &q
        && !ENDED.contains(&state.as_str())
    {
        let why = if reason.is_empty() || reason == "None" {
            String::new()
        } else {
            format!(" ({reason})")
        };
        let progress = parts
            .as_ref()
            .filter(|_| state == "PENDING")
            .and_then(|(array, n)| {
                parts_progress(array).map(|p| format!(": {}", p.line(array, *n)))
            })
            .unwrap_or_default();
        return Ok(Status::Active(format!("{state}{why}{progress}")));
    }
    let summary_file = job_dir.join(format!("{id}.summary.json"));
    if let Ok(text) = std::fs::read_to_string(&summary_file) {
        return Summary::parse(&text)
            .map(|s| Status::Finished(Box::new(s)))
            .ok_or_else(|| {
                Error::Follow(format!(
                    "{}: not a converter summary",
                    summary_file.display()
                ))
            });
    }
    let state = q.or_else(|| ended_state(id));
    let exit = std::fs::read_to_string(job_dir.join(format!("{id}.exit")))
        .ok()
        .map(|s| s.trim().to_owned());
    let log = job_dir.join(format!("{id}.out"));
    let what = match (&state, &exit) {
        (Some((s, _)), Some(code)) => format!("ended {s} (the converter exited {code})"),
        (Some((s, code)), None) => format!("ended {s} (exit code {code})"),
        (None, Some(code)) => format!("ended (the converter exited {code})"),
        (None, None) => "ended; Slurm no longer knows how".into(),
    };
    // The final step never ran because a part failed (Slurm cancels it then);
    // a final job cancelled or killed for another reason reads as any job.
    if let Some((array, n)) = &parts
        && exit.is_none()
        && let Some(p) = parts_progress(array).filter(|p| p.failed > 0)
    {
        let progress = p.line(array, *n);
        return Ok(Status::Finished(Box::new(Summary::failed(
            "",
            1,
            &format!(
                "the final step {what} before it ran: not every part succeeded ({progress}); nothing was published, the parts' logs are in {}; submitting the same command again runs the parts again, and a part already done rewrites nothing",
                job_dir.display()
            ),
        ))));
    }
    let parts_job = parts
        .map(|(array, _)| format!("; the parts' job: {array}"))
        .unwrap_or_default();
    Ok(Status::Finished(Box::new(Summary::failed(
        "",
        1,
        &format!(
            "{what} before the converter reported: nothing was published; its log: {}{parts_job}",
            log.display()
        ),
    ))))
}

/// Follows job `id` until it ends, calling `line` whenever its state changes.
///
/// # Errors
/// [`Error::Follow`] when `squeue` fails.
pub fn follow(job_dir: &Path, id: &str, line: &mut dyn FnMut(&str)) -> Result<Summary> {
    crate::follow(|| status(job_dir, id), line)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::profile::EnvFile;

    fn profile(extra: &str) -> Profile {
        EnvFile::parse(
            Path::new("env.toml"),
            &format!(
                "[slurm_convert_model]\nexecutor = \"slurm\"\naccount = \"acct\"\npartition = \"batch\"\nbatch_partition = \"backfill\"\ntime = \"02:00:00\"\nmounts = [\"/lustre:/lustre\"]\njob_dir = \"/lustre/me/jobs\"\nhf_home = \"/lustre/hf\"\nenv_vars = {{ X = \"it's\" }}\n{extra}"
            ),
        )
        .unwrap()
        .profile("slurm_convert_model")
        .unwrap()
    }

    fn req() -> Request {
        Request::new(
            ckpt_wire::Step::MegatronToHf,
            BTreeMap::from([
                ("megatron_path".into(), "/lustre/sft/iter_0000100".into()),
                ("hf_model_id".into(), "nvidia/Nemotron".into()),
                ("hf_path".into(), "/lustre/out/sft-hf".into()),
            ]),
            Path::new("/"),
        )
    }

    #[test]
    fn the_script_runs_the_converter_with_paths_unchanged() {
        let s = script(
            &profile(""),
            &req(),
            false,
            Path::new("/lustre/bin/ckpt-convert"),
            &Share::Whole,
        )
        .unwrap();
        for want in [
            "#SBATCH --job-name=ckpt-megatron-to-hf-sft-hf",
            "#SBATCH --output=/lustre/me/jobs/%j.out",
            "#SBATCH --account=acct",
            "#SBATCH --partition=backfill",
            "#SBATCH --time=02:00:00",
            "#SBATCH --export=NONE",
            "export CKPT_TERMINATION_LOG='/lustre/me/jobs'/\"$SLURM_JOB_ID\".summary.json",
            "export HF_HOME='/lustre/hf'",
            "export X='it'\\''s'",
            "'/lustre/bin/ckpt-convert' 'run' 'convert/megatron_to_hf' 'hf_model_id=nvidia/Nemotron' 'hf_path=/lustre/out/sft-hf' 'megatron_path=/lustre/sft/iter_0000100'",
        ] {
            assert!(s.contains(want), "missing {want:?} in\n{s}");
        }
        let attached = script(
            &profile(""),
            &req(),
            true,
            Path::new("/lustre/c"),
            &Share::Whole,
        )
        .unwrap();
        assert!(attached.contains("#SBATCH --partition=batch"));
    }

    #[test]
    fn an_image_runs_through_pyxis() {
        let p =
            profile("container_image = \"nvcr.io/me/ckpt-convert:0.1.0\"\ncpus_per_task = 16\n");
        let c = converter(&p).unwrap();
        assert_eq!(c, PathBuf::from(IMAGE_CONVERTER));
        let s = script(&p, &req(), false, &c, &Share::Whole).unwrap();
        assert!(
            s.contains("srun --ntasks=1 --export=ALL --container-image='nvcr.io/me/ckpt-convert:0.1.0' --container-mounts='/lustre:/lustre' '/ckpt-convert' 'run'"),
            "{s}"
        );
        assert!(
            s.contains("'--threads=16'") && s.contains("#SBATCH --cpus-per-task=16"),
            "{s}"
        );
    }

    #[test]
    fn paths_and_binaries_off_the_shared_filesystem_are_refused() {
        let mut r = req();
        r.params.insert("hf_path".into(), "/home/me/out".into());
        let e = script(
            &profile(""),
            &r,
            false,
            Path::new("/lustre/c"),
            &Share::Whole,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("hf_path=/home/me/out") && e.contains("/lustre"),
            "{e}"
        );
        let p = profile("converter = \"/usr/local/bin/ckpt-convert\"\n");
        assert!(
            converter(&p)
                .unwrap_err()
                .to_string()
                .contains("converter=")
        );
    }

    #[test]
    fn workers_alone_split_into_an_array_and_a_final_job() {
        let mut r = req();
        assert_eq!(split(&r).unwrap(), None);
        r.params.insert("workers".into(), "4".into());
        assert_eq!(split(&r).unwrap(), Some(4));
        let c = Path::new("/lustre/bin/ckpt-convert");
        let parts = script(&profile(""), &r, false, c, &Share::Parts(4)).unwrap();
        for want in [
            "#SBATCH --job-name=ckpt-megatron-to-hf-sft-hf-parts",
            "#SBATCH --array=0-3",
            "#SBATCH --output=/lustre/me/jobs/%j.out",
            "'hf_path=/lustre/out/sft-hf' 'megatron_path=/lustre/sft/iter_0000100' 'workers=4' \"part=$SLURM_ARRAY_TASK_ID\"",
        ] {
            assert!(parts.contains(want), "missing {want:?} in\n{parts}");
        }
        assert!(!parts.contains("--dependency"), "{parts}");
        let last = script(
            &profile(""),
            &r,
            false,
            c,
            &Share::Finalize { after: "77".into() },
        )
        .unwrap();
        for want in [
            "#SBATCH --job-name=ckpt-megatron-to-hf-sft-hf-finalize",
            "#SBATCH --dependency=afterok:77",
            "#SBATCH --kill-on-invalid-dep=yes",
            "'workers=4' 'finalize=true'",
        ] {
            assert!(last.contains(want), "missing {want:?} in\n{last}");
        }
        assert!(
            !last.contains("--array") && !last.contains("part="),
            "{last}"
        );
        // One share named: that share alone, as one job.
        for one in ["part", "finalize"] {
            let mut r = r.clone();
            r.params.insert(one.into(), "1".into());
            assert_eq!(split(&r).unwrap(), None, "{one}");
        }
        for bad in ["0", "-1", "four"] {
            r.params.insert("workers".into(), bad.into());
            let e = split(&r).unwrap_err().to_string();
            assert!(e.contains(&format!("workers={bad}")), "{e}");
        }
    }

    #[test]
    fn the_parts_line_says_what_is_done_running_and_failed() {
        let p = |done, running, failed| Parts {
            done,
            running,
            failed,
        };
        assert_eq!(p(2, 0, 0).line("41", 4), "parts job 41: 2/4 parts done");
        assert_eq!(
            p(1, 2, 1).line("41", 4),
            "parts job 41: 1/4 parts done, 2 running, 1 failed"
        );
    }

    #[test]
    fn array_task_ids_count_their_tasks() {
        for (ids, n) in [("3", 1), ("0-7", 8), ("1,4-5", 3), ("2-5%2", 4), ("0-0", 1)] {
            assert_eq!(tasks_in(ids), n, "{ids}");
        }
    }
}
