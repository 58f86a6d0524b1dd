//! `ckpt-convert run … --run|--batch PROFILE` with a Slurm profile, against a real
//! single-node Slurm (Debian's slurm-wlm and munge, started once for this binary
//! by `ckpt_testcluster::Slurm` with a configuration, state, ports and munge key
//! of its own). Each test has its own "shared filesystem" (a temp dir the profile
//! mounts), job directory and env.toml; the converter is this package's binary,
//! on a second mount.
//!
//! Needs `slurm-wlm` and `munge` (run-tests.sh installs them) and root (slurmd
//! starts jobs as their user); the cancellation test needs the `failpoints`
//! feature. A missing piece fails the test with how to get it; nothing is
//! skipped. Nothing waits on time: tests wait for files and job states, with a
//! generous deadline (`CKPT_TEST_DEADLINE_SECS`, default 600).

#[path = "../it/util.rs"]
#[allow(dead_code)]
mod util;

use std::path::PathBuf;
#[cfg(feature = "failpoints")]
use std::time::{Duration, Instant};

#[cfg(feature = "failpoints")]
use ckpt_testcluster::test_deadline as deadline;

use ckpt_convert::synthetic::ModelShape;
use ckpt_testcluster::Slurm;
use util::{Run, Workdir, bin};

fn slurm() -> &'static Slurm {
    Slurm::shared().unwrap_or_else(|e| panic!("{e}"))
}

/// A test's site: a workspace on "the shared filesystem" with a small Llama in it,
/// and an env.toml whose `slurm_convert_model` runs there.
struct Site {
    w: Workdir,
    env_file: PathBuf,
}

impl Site {
    fn new(extra: &str) -> Site {
        let w = Workdir::new();
        w.hf("ws/models/llama", &ModelShape::tiny_llama(), 1 << 30);
        let ws = w.path("ws");
        let exe = PathBuf::from(env!("CARGO_BIN_EXE_ckpt-convert"));
        let text = format!(
            r#"[slurm_base]
executor = "slurm"
partition = "debug"
mounts = ["{ws}", "{bin}"]
job_dir = "{ws}/jobs"
converter = "{exe}"

[slurm_convert_model]
extends = "slurm_base"
time = "00:30:00"
{extra}
"#,
            ws = ws.display(),
            bin = exe.parent().unwrap().display(),
            exe = exe.display(),
        );
        let env_file = w.path("env.toml");
        std::fs::write(&env_file, text).unwrap();
        Site { w, env_file }
    }

    fn ws(&self, rel: &str) -> PathBuf {
        self.w.path("ws").join(rel)
    }

    fn cli(&self, args: &[&str]) -> Run {
        let out = bin()
            .args(args)
            .env("CKPT_ENV_FILE", &self.env_file)
            .envs(slurm().env())
            .output()
            .unwrap();
        Run { out }
    }

    /// The batch scripts submitted from this site.
    fn submitted(&self) -> Vec<String> {
        self.w
            .ls("ws/jobs")
            .into_iter()
            .filter(|f| f.ends_with(".sbatch"))
            .collect()
    }

    /// What Slurm says about job `id`, for failure messages.
    fn job_state(&self, id: &str) -> String {
        let out = slurm()
            .command("scontrol")
            .args(["show", "job", id])
            .output()
            .unwrap();
        format!(
            "{}\nlog:\n{}\nslurmd:\n{}",
            String::from_utf8_lossy(&out.stdout),
            std::fs::read_to_string(self.ws(&format!("jobs/{id}.out"))).unwrap_or_default(),
            slurm().log_tail("slurmd", 20)
        )
    }
}

/// The job id `--batch` printed (its last line of stdout).
fn job_id(r: &Run) -> String {
    let out = r.stdout();
    let id = out.lines().last().unwrap_or_default().trim().to_owned();
    assert!(
        !id.is_empty() && id.chars().all(|c| c.is_ascii_digit()),
        "--batch printed no job id:\n{out}\n{}",
        r.stderr()
    );
    id
}

#[test]
fn a_batch_conversion_completes_and_its_output_validates() {
    let site = Site::new("");
    let out = site.ws("out/llama-megatron");
    let submit = site.cli(&[
        "run",
        "convert/hf_to_megatron",
        "-c",
        "default",
        "--batch",
        "slurm_convert_model",
        &format!("hf_model_id={}", site.ws("models/llama").display()),
        &format!("megatron_path={}", out.display()),
    ]);
    submit
        .assert_exit(0)
        .stderr_has("submitted Slurm job")
        .stderr_has("ckpt-convert status");
    let id = job_id(&submit);
    assert_eq!(site.submitted(), vec![format!("{id}.sbatch")]);
    // Followed until it ends; the report is the converter's, read from the job dir.
    let done = site.cli(&["status", &id, "--profile", "slurm_convert_model", "--wait"]);
    if done.code() != 0 {
        panic!("job {id}: {}\n{}", done.stderr(), site.job_state(&id));
    }
    let report = done.stdout();
    for want in [
        "convert/hf_to_megatron succeeded:",
        &format!(
            "  output:   {}/iter_0000000 (checkpoint_megatron)",
            out.display()
        ),
        "  manifest: ",
        "  weights digest: ",
        "checks passed; smoke test passed",
    ] {
        assert!(report.contains(want), "report lacks {want:?}:\n{report}");
    }
    // Asked again without the profile: Slurm still remembers the job, and where its
    // files are.
    let again = site.cli(&["status", &id]);
    again.assert_exit(0);
    assert_eq!(again.stdout(), report);
    // The output is a complete, valid checkpoint.
    bin()
        .args(["validate"])
        .arg(out.join("iter_0000000"))
        .args([&format!("reference={}", site.ws("models/llama").display())])
        .output()
        .map(|o| Run { out: o })
        .unwrap()
        .assert_exit(0)
        .stdout_has("checks passed");
}

#[test]
fn a_failing_conversion_reports_exit_1_and_the_converters_message() {
    let site = Site::new("");
    let src = site.ws("models/llama");
    ckpt_testcluster::poison_values(&src);
    let out = site.ws("out/poisoned");
    // The preflight here passes (it reads headers); the run fails in validation.
    let r = site.cli(&[
        "run",
        "convert/hf_to_megatron",
        "--run",
        "slurm_convert_model",
        &format!("hf_model_id={}", src.display()),
        &format!("megatron_path={}", out.display()),
    ]);
    r.assert_exit(1)
        .stderr_has("submitted Slurm job")
        .stderr_has("validation failed")
        .stderr_has("NaN or infinite values")
        .stderr_has("nothing published");
    assert!(!out.join("iter_0000000").exists());

    // A refusal of the preflight here is exit 2, as locally, and submits nothing.
    let before = site.submitted();
    let r = site.cli(&[
        "run",
        "convert/megatron_to_hf",
        "--batch",
        "slurm_convert_model",
        &format!(
            "megatron_path={}",
            site.ws("out/none/iter_0000001").display()
        ),
        &format!("hf_model_id={}", src.display()),
        &format!("hf_path={}", site.ws("out/hf").display()),
    ]);
    r.assert_exit(2).stderr_has("preflight");
    assert_eq!(site.submitted(), before);
    // So is a path outside the profile's mounts, naming the path and the mounts.
    let elsewhere = Workdir::new();
    let outside = elsewhere.hf("llama", &ModelShape::tiny_llama(), 1 << 30);
    let r = site.cli(&[
        "run",
        "convert/hf_to_megatron",
        "--batch",
        "slurm_convert_model",
        &format!("hf_model_id={}", outside.display()),
        &format!("megatron_path={}", out.display()),
    ]);
    r.assert_exit(2)
        .stderr_has(&format!(
            "hf_model_id={}: outside every mount",
            outside.display()
        ))
        .stderr_has(&format!(
            "slurm_convert_model: {}",
            site.w.path("ws").display()
        ));
    assert_eq!(site.submitted(), before);
}

#[cfg(feature = "failpoints")]
#[test]
fn scancel_of_a_running_job_leaves_no_published_output() {
    let marker = tempfile::tempdir().unwrap();
    let paused = marker.path().join("paused");
    // The converter stops after writing two pieces into its staging directory,
    // and says so by creating `paused`.
    let site = Site::new(&format!(
        "env_vars = {{ CKPT_CONVERT_PAUSE_AT = \"pieces:2\", CKPT_CONVERT_PAUSE_FILE = \"{}\" }}",
        paused.display()
    ));
    let out = site.ws("out/cancelled");
    let submit = site.cli(&[
        "run",
        "convert/hf_to_megatron",
        "--batch",
        "slurm_convert_model",
        &format!("hf_model_id={}", site.ws("models/llama").display()),
        &format!("megatron_path={}", out.display()),
    ]);
    submit.assert_exit(0);
    let id = job_id(&submit);
    let started = Instant::now();
    while !paused.exists() {
        assert!(
            started.elapsed() < deadline(),
            "the converter never reached its pause:\n{}",
            site.job_state(&id)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Mid-write: the job runs, pieces are in a staging directory beside the target
    // (in the run directory, beside where iter_0000000 will be).
    let running = site.cli(&["status", &id, "--profile", "slurm_convert_model"]);
    running.assert_exit(3).stdout_has("RUNNING");
    let staged = site.w.ls("ws/out/cancelled");
    assert!(
        staged.len() == 1 && staged[0].contains("staging"),
        "expected one staging directory beside the target, found {staged:?}"
    );
    let cancel = slurm().command("scancel").arg(&id).output().unwrap();
    assert!(
        cancel.status.success(),
        "{}",
        String::from_utf8_lossy(&cancel.stderr)
    );
    // scancel sends SIGTERM first: the converter removes its staging, reports the
    // interruption in its summary and exits 128 + 15, which the user gets as from a
    // local run.
    let r = site.cli(&["status", &id, "--profile", "slurm_convert_model", "--wait"]);
    r.assert_exit(143)
        .stderr_has(&format!("job {id}: interrupted by SIGTERM"))
        .stderr_has("nothing was published");
    for published in ["iter_0000000", "latest_checkpointed_iteration.txt"] {
        assert!(
            !out.join(published).exists(),
            "{published} was published: {:?}",
            site.w.ls("ws/out/cancelled")
        );
    }
    assert!(
        site.w.ls("ws/out/cancelled").is_empty(),
        "staging left: {:?}",
        site.w.ls("ws/out/cancelled")
    );
}

#[cfg(not(feature = "failpoints"))]
#[test]
fn scancel_of_a_running_job_leaves_no_published_output() {
    panic!(
        "this test needs the failpoints feature: cargo test --features failpoints (the repository's test command passes it)"
    );
}

/// The profile runs the job where it says: the script sbatch received names the
/// partition and time of the profile and the converter on the shared filesystem.
#[test]
fn the_submitted_script_is_the_dry_runs() {
    let site = Site::new("");
    let args = [
        "run",
        "convert/hf_to_megatron",
        "--batch",
        "slurm_convert_model",
        &format!("hf_model_id={}", site.ws("models/llama").display()),
        &format!("megatron_path={}", site.ws("out/dry").display()),
    ]
    .map(str::to_owned);
    let mut dry: Vec<&str> = args.iter().map(String::as_str).collect();
    dry.push("--dry-run");
    let script = site.cli(&dry);
    script.assert_exit(0);
    assert!(site.submitted().is_empty(), "--dry-run submitted a job");
    let text = script.stdout();
    for want in [
        "#SBATCH --partition=debug",
        "#SBATCH --time=00:30:00",
        env!("CARGO_BIN_EXE_ckpt-convert"),
    ] {
        assert!(text.contains(want), "{want:?} not in\n{text}");
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let submit = site.cli(&args);
    submit.assert_exit(0);
    let id = job_id(&submit);
    let kept = std::fs::read_to_string(site.ws(&format!("jobs/{id}.sbatch"))).unwrap();
    // Submitted detached, as the dry run of the same command shows it.
    assert_eq!(kept, text);
    let done = site.cli(&["status", &id, "--profile", "slurm_convert_model", "--wait"]);
    done.assert_exit(0);
}

/// The manifest's weights digest and its list of files (path, size, digest).
fn manifest_of(dir: &std::path::Path) -> (serde_json::Value, serde_json::Value) {
    let text = std::fs::read(dir.join("ckpt-manifest.json")).unwrap();
    let m: serde_json::Value = serde_json::from_slice(&text).unwrap();
    (m["output"]["weights_digest"].clone(), m["files"].clone())
}

/// `workers=N` on a Slurm profile: a job array of N parts, then a final job that
/// Slurm starts once every part succeeded; `status` follows the final job, and
/// the output is what one local run writes.
#[test]
fn workers_on_a_slurm_profile_run_an_array_of_parts_then_publish() {
    let site = Site::new("");
    let src = site.ws("models/llama");
    let single = site.ws("out/single");
    bin()
        .args(["run", "convert/hf_to_megatron", "distcp_files=3"])
        .arg(format!("hf_model_id={}", src.display()))
        .arg(format!("megatron_path={}", single.display()))
        .output()
        .map(|o| Run { out: o })
        .unwrap()
        .assert_exit(0);
    let out = site.ws("out/split");
    let submit = site.cli(&[
        "run",
        "convert/hf_to_megatron",
        "--batch",
        "slurm_convert_model",
        &format!("hf_model_id={}", src.display()),
        &format!("megatron_path={}", out.display()),
        "distcp_files=3",
        "workers=3",
    ]);
    submit
        .assert_exit(0)
        .stderr_has("submitted Slurm job array ")
        .stderr_has("(3 parts) and job ");
    let id = job_id(&submit);
    let scripts = site.submitted();
    assert_eq!(scripts.len(), 2, "{scripts:?}");
    let array = scripts
        .iter()
        .map(|s| s.trim_end_matches(".sbatch").to_owned())
        .find(|s| *s != id)
        .unwrap();
    let script = |j: &str| std::fs::read_to_string(site.ws(&format!("jobs/{j}.sbatch"))).unwrap();
    let parts = script(&array);
    assert!(
        parts.contains("#SBATCH --array=0-2")
            && parts.contains("'workers=3' \"part=$SLURM_ARRAY_TASK_ID\""),
        "{parts}"
    );
    let last = script(&id);
    assert!(
        last.contains(&format!("#SBATCH --dependency=afterok:{array}"))
            && last.contains("'workers=3' 'finalize=true'"),
        "{last}"
    );
    let done = site.cli(&["status", &id, "--profile", "slurm_convert_model", "--wait"]);
    if done.code() != 0 {
        panic!(
            "job {id}: {}\n{}\nparts:\n{}",
            done.stderr(),
            site.job_state(&id),
            site.job_state(&array)
        );
    }
    done.stdout_has("convert/hf_to_megatron succeeded:")
        .stdout_has("checks passed; smoke test passed");
    assert_eq!(
        manifest_of(&single.join("iter_0000000")),
        manifest_of(&out.join("iter_0000000")),
        "the split's output is the single run's"
    );
    // Three parts ran, each a job of its own with its own summary.
    let summaries: Vec<String> = site
        .w
        .ls("ws/jobs")
        .into_iter()
        .filter(|f| f.ends_with(".summary.json"))
        .map(|f| std::fs::read_to_string(site.ws(&format!("jobs/{f}"))).unwrap())
        .collect();
    assert_eq!(summaries.len(), 4, "{summaries:#?}");
    for i in 0..3 {
        let part = format!("part {i} of 3 is in");
        assert_eq!(
            summaries.iter().filter(|s| s.contains(&part)).count(),
            1,
            "{part}: {summaries:#?}"
        );
    }
    let left: Vec<String> = site
        .w
        .ls("ws/out/split")
        .into_iter()
        .filter(|n| n.contains(".ckpt-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// A part that fails leaves the final job's dependency unmet: Slurm cancels it,
/// and `status` says a part failed, naming the parts' job; nothing is published.
#[cfg(feature = "failpoints")]
#[test]
fn a_failed_part_on_slurm_cancels_the_final_job_and_publishes_nothing() {
    // Every part's read of the source fails in the job (the preflight here, which
    // runs without the profile's environment, reads it).
    let site = Site::new("env_vars = { CKPT_CONVERT_FAIL_READ = \"model.safetensors\" }");
    let out = site.ws("out/split");
    let submit = site.cli(&[
        "run",
        "convert/hf_to_megatron",
        "--batch",
        "slurm_convert_model",
        &format!("hf_model_id={}", site.ws("models/llama").display()),
        &format!("megatron_path={}", out.display()),
        "workers=2",
    ]);
    submit.assert_exit(0);
    let id = job_id(&submit);
    let done = site.cli(&["status", &id, "--profile", "slurm_convert_model", "--wait"]);
    assert_eq!(done.code(), 1, "{}\n{}", done.stderr(), site.job_state(&id));
    done.stderr_has("not every part succeeded")
        .stderr_has("parts job ")
        .stderr_has("nothing was published");
    assert!(!out.join("iter_0000000").exists());
    // The final step never ran.
    assert!(!site.ws(&format!("jobs/{id}.exit")).exists());
}

#[cfg(not(feature = "failpoints"))]
#[test]
fn a_failed_part_on_slurm_cancels_the_final_job_and_publishes_nothing() {
    panic!(
        "this test needs the failpoints feature: cargo test --features failpoints (the repository's test command passes it)"
    );
}
