//! `ckpt-convert run STEP --run|--batch PROFILE` with a Kubernetes profile: the
//! converter binary creates the `CheckpointConversion` through a kubeconfig, this
//! namespace's operator runs it, and the command reads the outcome from status.
//!
//! The guide's command runs verbatim: `/mnt/lustre-shared` is the claim's
//! directory, bind-mounted there in a private mount namespace of the command
//! (`unshare`), so nothing outside the test sees it.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use ckpt_operator::api::{ArtifactKind, CheckpointConversion};
use ckpt_testcluster::converter_binary;
use kube::api::ListParams;

use crate::support::{Env, converting, cp, deadline, fixtures};

/// The guide's closing command, as printed there.
const GUIDE: &[&str] = &[
    "run",
    "convert/megatron_to_hf",
    "-c",
    "default",
    "--batch",
    "lepton_convert_model",
    "megatron_path=/mnt/lustre-shared/output/sft/megatron_bridge/iter_0000100",
    "hf_model_id=nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-Base-BF16",
    "hf_path=/mnt/lustre-shared/output/convert/sft-hf",
];

/// A Lepton profile for this test's namespace, as `profiles example lepton`
/// prints it, with the workspace at `workspace`.
fn lepton_profile(env: &Env, workspace: &Path) -> PathBuf {
    let text = format!(
        r#"[lepton_base]
executor = "kubernetes"
namespace = "{ns}"
container_image = "ghcr.io/ckpt-dev/ckpt-convert:0.1.0"
mounts = [{{ path = "{ws}", claim = "lustre-shared" }}]
hf_home = "{ws}/hf"

[lepton_convert_model]
extends = "lepton_base"
resources = {{ requests = {{ cpu = "1", memory = "1Gi" }} }}
"#,
        ns = env.ns,
        ws = workspace.display()
    );
    let path = env.dir.path().join("env.lepton.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A command's exit code and output.
struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Out {
    fn expect_ok(self, what: &str) -> String {
        assert_eq!(
            self.code,
            Some(0),
            "{what} failed:\nstdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        self.stdout
    }
}

/// `ckpt-convert ARGS` with the cluster's admin kubeconfig and the profile file
/// the Nemotron tooling's variable names; `prefix` runs it under another program.
async fn cli(env_file: &Path, prefix: &[String], args: &[&str], kubeconfig: Option<&Path>) -> Out {
    let bin = converter_binary().unwrap_or_else(|e| panic!("{e}"));
    let mut words: Vec<String> = prefix.to_vec();
    words.push(bin.display().to_string());
    words.extend(args.iter().map(|a| (*a).to_owned()));
    let mut cmd = tokio::process::Command::new(&words[0]);
    cmd.args(&words[1..])
        .env("NEMOTRON_ENV_FILE", env_file)
        .env_remove("CKPT_ENV_FILE")
        .env_remove("HF_HUB_CACHE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    match kubeconfig {
        Some(k) => cmd.env("KUBECONFIG", k),
        None => cmd.env("KUBECONFIG", cp().await.kubeconfig_path()),
    };
    let out = tokio::time::timeout(deadline(), cmd.output())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "ckpt-convert {args:?} did not finish within {:?}",
                deadline()
            )
        })
        .expect("running ckpt-convert");
    Out {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs the rest of a command line with `claim` at `/mnt/lustre-shared`, in a
/// mount namespace of its own (a user namespace too when not root).
fn at_mnt_lustre_shared(claim: &Path) -> Vec<String> {
    // SAFETY: geteuid only reads the process's credentials.
    let root = unsafe { libc::geteuid() } == 0;
    let mut v: Vec<String> = vec!["unshare".into()];
    if !root {
        v.extend(["--user".into(), "--map-root-user".into()]);
    }
    v.extend([
        "--mount".into(),
        "--propagation".into(),
        "private".into(),
        "sh".into(),
        "-c".into(),
        r#"set -e; mount -t tmpfs ckpt-test /mnt; mkdir /mnt/lustre-shared; mount --bind "$1" /mnt/lustre-shared; shift; exec "$@""#.into(),
        "sh".into(),
        claim.display().to_string(),
    ]);
    v
}

async fn resources(env: &Env) -> Vec<CheckpointConversion> {
    env.api()
        .await
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
}

/// The Nemotron-3 Nano model id in the workspace's Hugging Face cache, holding the
/// small Llama the SFT fixture was converted from (the converter reads the
/// architecture from config.json, not from the name).
fn cache_the_guide_model(env: &Env) {
    let repo = env
        .claim("lustre-shared")
        .join("hf/hub/models--nvidia--NVIDIA-Nemotron-3-Nano-30B-A3B-Base-BF16");
    let snapshot = repo.join("snapshots/0123456789abcdef");
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123456789abcdef").unwrap();
    let base = env.claim("models").join("hf/Llama-3.2-3B");
    for f in std::fs::read_dir(&base).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, snapshot.join(f.file_name().unwrap())).unwrap();
    }
}

#[tokio::test]
async fn the_guides_command_runs_verbatim_with_a_lepton_profile() {
    let (env, mut op) = converting("profile-guide").await;
    cache_the_guide_model(&env);
    let claim = env.claim("lustre-shared");
    let profile = lepton_profile(&env, Path::new("/mnt/lustre-shared"));
    let ns = at_mnt_lustre_shared(&claim);

    let submit = cli(&profile, &ns, GUIDE, None).await;
    let stdout = submit.expect_ok("the guide's command with --batch");
    let name = stdout.lines().last().unwrap_or_default().to_owned();
    // --batch returns the resource's name at once; the operator does the rest.
    let (rns, rname) = name.split_once('/').expect("NAMESPACE/NAME");
    assert_eq!(rns, env.ns);
    let cr = env.get(rname).await;
    let s = &cr.spec;
    assert_eq!(
        (s.source.kind, s.source.pvc.as_str(), s.source.path.as_str()),
        (
            ArtifactKind::CheckpointMegatron,
            "lustre-shared",
            "output/sft/megatron_bridge/iter_0000100"
        )
    );
    assert_eq!(s.target.path, "output/convert/sft-hf");
    let base = s.base_model.as_ref().unwrap();
    assert_eq!(
        (
            base.pvc.as_str(),
            base.path.as_str(),
            base.model_id.as_deref()
        ),
        (
            "lustre-shared",
            "hf/hub",
            Some("nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-Base-BF16")
        )
    );

    // Followed until it ends: Succeeded, with the report of a local run, its paths
    // as the user's machine sees them.
    let done = cli(
        &profile,
        &ns,
        &[
            "status",
            &name,
            "--profile",
            "lepton_convert_model",
            "--wait",
        ],
        None,
    )
    .await;
    op.assert_running();
    let report = done.expect_ok("status --wait");
    for want in [
        "convert/megatron_to_hf succeeded:",
        "  output:   /mnt/lustre-shared/output/convert/sft-hf (checkpoint_hf)",
        "  manifest: /mnt/lustre-shared/output/convert/sft-hf/ckpt-manifest.json",
        "  weights digest: ",
        "checks passed; smoke test passed",
    ] {
        assert!(report.contains(want), "report lacks {want:?}:\n{report}");
    }
    let cr = env.get(rname).await;
    assert_eq!(
        cr.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded")
    );
    // The output on the claim is complete and valid.
    let out = std::process::Command::new(converter_binary().unwrap())
        .arg("validate")
        .arg(claim.join("output/convert/sft-hf"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(resources(&env).await.len(), 1);
}

#[tokio::test]
async fn refusals_exit_2_with_the_reason_and_create_nothing() {
    let env = Env::new("profile-refusals").await;
    fixtures(&env);
    cache_the_guide_model(&env);
    let claim = env.claim("lustre-shared");
    let profile = lepton_profile(&env, &claim);
    let sft = claim.join("output/sft/megatron_bridge/iter_0000100");
    let hf = claim.join("output/convert/sft-hf");
    let id = "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-Base-BF16".to_owned();
    // The guide's command with this workspace, `profile`, `model` and `kubeconfig`:
    // its exit code and stderr.
    let refused = |name: &'static str, model: String, kubeconfig: Option<PathBuf>| {
        let profile = profile.clone();
        let args = [
            "run".to_owned(),
            "convert/megatron_to_hf".to_owned(),
            "--batch".to_owned(),
            name.to_owned(),
            format!("megatron_path={}", sft.display()),
            format!("hf_model_id={model}"),
            format!("hf_path={}", hf.display()),
        ];
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let r = cli(&profile, &[], &args, kubeconfig.as_deref()).await;
            assert_eq!(
                r.code,
                Some(2),
                "stdout:\n{}\nstderr:\n{}",
                r.stdout,
                r.stderr
            );
            r.stderr
        }
    };

    // A path outside the workspace (the models claim is not mounted by the
    // profile): named with the profile's mounts.
    let outside = env.claim("models").join("hf/Llama-3.2-3B");
    let e = refused("lepton_convert_model", outside.display().to_string(), None).await;
    for want in [
        format!(
            "hf_model_id={}: outside every mount of profile lepton_convert_model",
            outside.display()
        ),
        format!("{} (claim lustre-shared)", claim.display()),
    ] {
        assert!(e.contains(&want), "{e}");
    }
    // An unknown profile: named, with the file's profiles.
    let e = refused("lepton_convert_modle", id.clone(), None).await;
    assert!(
        e.contains("profile lepton_convert_modle: no such profile; profiles: lepton_base, lepton_convert_model"),
        "{e}"
    );
    // A missing kubeconfig: named.
    let missing = env.dir.path().join("no-kubeconfig");
    let e = refused("lepton_convert_model", id.clone(), Some(missing.clone())).await;
    assert!(
        e.contains("kubeconfig") && e.contains(&missing.display().to_string()),
        "{e}"
    );
    // With a good kubeconfig, a dry run prints the manifest and creates nothing
    // either.
    let dry = [
        "run",
        "convert/megatron_to_hf",
        "--batch",
        "lepton_convert_model",
        &format!("megatron_path={}", sft.display()),
        &format!("hf_model_id={id}"),
        &format!("hf_path={}", hf.display()),
        "--dry-run",
    ];
    let manifest = cli(&profile, &[], &dry, None).await.expect_ok("--dry-run");
    assert!(
        manifest.contains("kind: CheckpointConversion")
            && manifest.contains(&format!("namespace: {}", env.ns)),
        "{manifest}"
    );
    assert!(
        resources(&env).await.is_empty(),
        "a refusal created a resource"
    );
}

#[tokio::test]
async fn a_failing_run_reports_exit_1_with_the_converters_message() {
    let (env, mut op) = converting("profile-failing").await;
    let claim = env.claim("lustre-shared");
    // A source whose headers are fine (the preflight here passes) and whose values
    // are not: the run fails in validation, on the cluster.
    let src = claim.join("models/poisoned");
    std::fs::create_dir_all(&src).unwrap();
    for f in std::fs::read_dir(env.claim("models").join("hf/Llama-3.2-3B")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, src.join(f.file_name().unwrap())).unwrap();
    }
    ckpt_testcluster::poison_values(&src);
    let profile = lepton_profile(&env, &claim);
    let out = claim.join("output/poisoned-megatron");
    let r = cli(
        &profile,
        &[],
        &[
            "run",
            "convert/hf_to_megatron",
            "--run",
            "lepton_convert_model",
            &format!("hf_model_id={}", src.display()),
            &format!("megatron_path={}", out.display()),
        ],
        None,
    )
    .await;
    op.assert_running();
    assert_eq!(
        r.code,
        Some(1),
        "stdout:\n{}\nstderr:\n{}",
        r.stdout,
        r.stderr
    );
    for want in [
        "created CheckpointConversion",
        "Running",
        "validation failed",
        "NaN or infinite values",
    ] {
        assert!(
            r.stderr.contains(want),
            "stderr lacks {want:?}:\n{}",
            r.stderr
        );
    }
    assert!(!out.join("iter_0000000").exists());
    // The same command again names the same resource and runs it again.
    let again = cli(
        &profile,
        &[],
        &[
            "run",
            "convert/hf_to_megatron",
            "--batch",
            "lepton_convert_model",
            &format!("hf_model_id={}", src.display()),
            &format!("megatron_path={}", out.display()),
        ],
        None,
    )
    .await;
    let name = again.stdout.trim().to_owned();
    assert!(
        again
            .stderr
            .contains("had failed: raised spec.retry to run it again"),
        "{}",
        again.stderr
    );
    let all = resources(&env).await;
    assert_eq!(all.len(), 1, "{all:#?}");
    assert_eq!(
        format!("{}/{}", env.ns, all[0].metadata.name.as_deref().unwrap()),
        name
    );
    assert_eq!(all[0].spec.retry, Some(1));
}
