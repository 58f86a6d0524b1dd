//! Profiles without a cluster: the env.toml is found as documented, listed and
//! shown, its mistakes refused before anything runs, and a `local` profile runs
//! the step here. (The Kubernetes and Slurm executors are proven against real
//! peers: operator/tests/cluster/profiles.rs and tests/slurm.)

use std::process::Command;

use ckpt_convert::synthetic::ModelShape;

use crate::util::{Run, Workdir, bin};

/// `ckpt-convert ARGS` in `dir`, with only the profile variables given.
fn in_dir(dir: &std::path::Path, vars: &[(&str, &std::path::Path)], args: &[&str]) -> Run {
    let mut c: Command = bin();
    c.current_dir(dir)
        .env_remove("CKPT_ENV_FILE")
        .env_remove("NEMOTRON_ENV_FILE")
        .env_remove("KUBECONFIG")
        .env_remove("NEMOTRON_WORKSPACE")
        .args(args);
    for (k, v) in vars {
        c.env(k, v);
    }
    Run {
        out: c.output().expect("run ckpt-convert"),
    }
}

#[test]
fn the_examples_list_and_a_broken_profile_is_named_in_the_listing() {
    let w = Workdir::new();
    let dir = w.path("");
    let example = in_dir(&dir, &[], &["profiles", "example"]);
    example.assert_exit(0);
    let text = format!(
        "{}\n[broken]\nextends = \"lepton_base\"\ngpus_per_node = 8\n",
        example.stdout()
    );
    std::fs::write(w.path("env.toml"), text).unwrap();
    let list = in_dir(&dir, &[], &["profiles"]);
    list.assert_exit(0);
    for want in [
        "lepton_convert_model         kubernetes  namespace training; /mnt/lustre-shared (claim lustre-shared)",
        "dgxcloud_convert_model       kubernetes  namespace runai-my-project; /workspace (claim workspace-pvc)",
        "slurm_convert_model          slurm       partition batch; /lustre;",
        "broken                       error: env.toml: profile broken: gpus_per_node: unknown key",
    ] {
        list.stdout_has(want);
    }
    in_dir(&dir, &[], &["profiles", "show", "slurm_convert_model"])
        .assert_exit(0)
        .stdout_has("extends: slurm_base")
        .stdout_has("hf_home: /lustre/");
    in_dir(&dir, &[], &["profiles", "example", "kubeflow"])
        .assert_exit(2)
        .stderr_has("expected one of lepton, dgxcloud, slurm");
}

#[test]
fn the_env_file_is_found_as_documented() {
    let w = Workdir::new();
    let dir = w.path("");
    let profile = |name: &str| format!("[{name}]\nexecutor = \"local\"\n");
    std::fs::write(w.path("env.toml"), profile("from_cwd")).unwrap();
    std::fs::write(w.path("nemotron.toml"), profile("from_nemotron")).unwrap();
    std::fs::write(w.path("ckpt.toml"), profile("from_ckpt")).unwrap();
    std::fs::write(w.path("flag.toml"), profile("from_flag")).unwrap();
    let (nemotron, ckpt) = (w.path("nemotron.toml"), w.path("ckpt.toml"));
    in_dir(&dir, &[], &["profiles"]).stdout_has("from_cwd");
    in_dir(&dir, &[("NEMOTRON_ENV_FILE", &nemotron)], &["profiles"]).stdout_has("from_nemotron");
    in_dir(
        &dir,
        &[("NEMOTRON_ENV_FILE", &nemotron), ("CKPT_ENV_FILE", &ckpt)],
        &["profiles"],
    )
    .stdout_has("from_ckpt");
    in_dir(
        &dir,
        &[("CKPT_ENV_FILE", &ckpt)],
        &["profiles", "--env-file", "flag.toml"],
    )
    .stdout_has("from_flag");
    let empty = Workdir::new();
    in_dir(&empty.path(""), &[], &["profiles"])
        .assert_exit(2)
        .stderr_has("no profiles file")
        .stderr_has("CKPT_ENV_FILE");
}

#[test]
fn a_broken_profile_is_refused_before_anything_runs() {
    let w = Workdir::new();
    let src = w.hf("src", &ModelShape::tiny_llama(), 1 << 30);
    let out = w.path("out");
    std::fs::write(
        w.path("env.toml"),
        "[a]\nextends = \"b\"\n[b]\nextends = \"a\"\n\
         [k]\nexecutor = \"kubernetes\"\nmounts = [{ path = \"/x\", claim = \"c\" }]\npartition = \"batch\"\n\
         [s]\nexecutor = \"slurm\"\nmounts = [\"/x\"]\n",
    )
    .unwrap();
    let run = |profile: &str| {
        in_dir(
            &w.path(""),
            &[],
            &[
                "run",
                "convert/hf_to_megatron",
                "--batch",
                profile,
                &format!("hf_model_id={}", src.display()),
                &format!("megatron_path={}", out.display()),
            ],
        )
    };
    run("a")
        .assert_exit(2)
        .stderr_has("profile b: extends = \"a\" makes a cycle: a → b → a");
    run("k")
        .assert_exit(2)
        .stderr_has("profile k: partition: applies to executor slurm, not to executor kubernetes");
    run("s")
        .assert_exit(2)
        .stderr_has("profile s: job_dir is required for executor slurm");
    assert!(!out.exists());
}

#[test]
fn a_local_profile_runs_here_with_its_hugging_face_cache() {
    let w = Workdir::new();
    // A model id in the profile's cache, not in the environment's.
    let repo = w.path("hf/hub/models--org--tiny");
    w.hf(
        "hf/hub/models--org--tiny/snapshots/abc",
        &ModelShape::tiny_llama(),
        1 << 30,
    );
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "abc").unwrap();
    std::fs::write(
        w.path("env.toml"),
        format!(
            "[here]\nexecutor = \"local\"\nhf_home = \"{}\"\n",
            w.path("hf").display()
        ),
    )
    .unwrap();
    let out = w.path("out");
    in_dir(
        &w.path(""),
        &[],
        &[
            "run",
            "convert/hf_to_megatron",
            "--run",
            "here",
            "hf_model_id=org/tiny",
            &format!("megatron_path={}", out.display()),
        ],
    )
    .assert_exit(0)
    .stdout_has("convert/hf_to_megatron succeeded");
    assert!(out.join("iter_0000000/.metadata").is_file());
    in_dir(&w.path(""), &[], &["status", "1", "--profile", "here"])
        .assert_exit(2)
        .stderr_has("runs steps here");
}

/// `workers=N` on a Kubernetes profile becomes `spec.workers`: the preflight
/// here plans the whole conversion (a part's plan is the same), so the split's
/// parameters are no refusal; `part` and `finalize` are the operator's to give.
#[test]
fn workers_on_a_kubernetes_profile_is_spec_workers() {
    let w = Workdir::new();
    let src = w.hf("ws/models/llama", &ModelShape::tiny_llama(), 1 << 30);
    std::fs::write(
        w.path("env.toml"),
        format!(
            "[k]\nexecutor = \"kubernetes\"\nnamespace = \"training\"\nmounts = [{{ path = \"{}\", claim = \"ws\" }}]\n",
            w.path("ws").display()
        ),
    )
    .unwrap();
    let args = |extra: &str| {
        let mut a = vec![
            "run".to_owned(),
            "convert/hf_to_megatron".into(),
            "--batch".into(),
            "k".into(),
            "--dry-run".into(),
            format!("hf_model_id={}", src.display()),
            format!("megatron_path={}", w.path("ws/out/llama").display()),
            "workers=3".into(),
        ];
        a.extend(extra.split_whitespace().map(str::to_owned));
        a
    };
    let run = |extra: &str| {
        let a = args(extra);
        in_dir(
            &w.path(""),
            &[],
            &a.iter().map(String::as_str).collect::<Vec<_>>(),
        )
    };
    let cr = run("");
    cr.assert_exit(0);
    let text = cr.stdout();
    assert!(
        text.contains("kind: CheckpointConversion") && text.contains("  workers: 3\n"),
        "{text}"
    );
    assert!(
        !text.contains("part") && !text.contains("finalize"),
        "{text}"
    );
    run("part=1")
        .assert_exit(2)
        .stderr_has("give workers=N alone");
}
