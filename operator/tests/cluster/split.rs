//! One conversion split across pods (`spec.workers`): the parts' Indexed Job, then
//! the final step's Job, give the single run's output, byte for byte.

use std::path::{Path, PathBuf};

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use serde_json::Value;

use crate::faults::published;
use crate::support::{
    Env, Gate, Operator, Waiting, contents, converting, finished, fixtures, validated,
};

/// A resource converting `source` (a directory on claim `source_pvc`) to
/// `lustre-shared:output/convert/NAME` with `workers` pods (the directory the
/// examples' targets are in: on the real node it is made writable for the image's
/// user before the claims are bound).
fn resource(
    ns: &str,
    name: &str,
    step: (&str, &str),
    source: (&str, &str),
    workers: i32,
) -> String {
    let (from, to) = step;
    let (pvc, path) = source;
    // The HF export takes its config and tokenizer from the base model.
    let base = if to == "checkpoint_hf" {
        "  baseModel: {pvc: models, path: hf/Llama-3.2-3B}\n"
    } else {
        "  parameters: {distcp_files: \"4\"}\n"
    };
    format!(
        r#"apiVersion: ckpt.dev/v1alpha1
kind: CheckpointConversion
metadata: {{name: {name}, namespace: {ns}}}
spec:
  source: {{kind: {from}, pvc: {pvc}, path: {path}}}
  target: {{kind: {to}, pvc: lustre-shared, path: output/convert/{name}}}
{base}  workers: {workers}
  job:
    resources: {{requests: {{cpu: 100m}}}}
"#
    )
}

/// Every published file by relative path, with its bytes; the manifest and the
/// validation report without what differs between any two runs (when and how
/// long), which the runs' single and split steps write alike otherwise. Each
/// resource's output has its own name (`target`), which the manifest records
/// with the output's path.
fn output_files(dir: &Path, target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    /// The output's own name, wherever a path names it (and names made from it:
    /// a merge's second output `NAME-mg`).
    fn rename(v: &mut Value, target: &str) {
        match v {
            Value::String(s) => {
                let within = format!("/{target}/");
                *s = format!("{s}/")
                    .replace(&within, "/<target>/")
                    .replace(&format!("/{target}-"), "/<target>-");
                s.pop();
            }
            Value::Object(m) => m.values_mut().for_each(|v| rename(v, target)),
            Value::Array(a) => a.iter_mut().for_each(|v| rename(v, target)),
            _ => {}
        }
    }
    contents(dir)
        .into_keys()
        .map(|rel| {
            let mut bytes = std::fs::read(dir.join(&rel)).unwrap();
            let name = rel.file_name().unwrap().to_string_lossy();
            if name == "ckpt-manifest.json" || name == "ckpt-validation.json" {
                let mut v: Value = serde_json::from_slice(&bytes).unwrap();
                ckpt_testcluster::without_run_times(&mut v);
                ckpt_testcluster::take_read_back_note(&mut v);
                rename(&mut v, target);
                bytes = serde_json::to_vec_pretty(&v).unwrap();
            }
            (rel, bytes)
        })
        .collect()
}

/// Asserts that the outputs of resources `want` and `got` (their targets under
/// `out`, `sub` inside them) are the same.
#[track_caller]
fn assert_same(out: &Path, want: &str, got: &str, sub: &str) {
    let what = got;
    // A merge's second output `NAME-mg` names the resource's output `NAME` too.
    let w = output_files(&out.join(want).join(sub), want.trim_end_matches("-mg"));
    let g = output_files(&out.join(got).join(sub), got.trim_end_matches("-mg"));
    assert_eq!(
        w.iter().map(|(p, _)| p).collect::<Vec<_>>(),
        g.iter().map(|(p, _)| p).collect::<Vec<_>>(),
        "{what}: files"
    );
    for ((path, a), (_, b)) in w.iter().zip(&g) {
        if a == b {
            continue;
        }
        // Around the first line that differs.
        let (a, b) = (String::from_utf8_lossy(a), String::from_utf8_lossy(b));
        let first = a
            .lines()
            .zip(b.lines())
            .position(|(x, y)| x != y)
            .unwrap_or(0);
        let around = |t: &str| {
            let lines: Vec<&str> = t.lines().collect();
            let end = (first + 3).min(lines.len());
            lines[first.saturating_sub(3).min(end)..end].join("\n")
        };
        panic!(
            "{what}: {} differs at line {first}:\n{}\n---\n{}",
            path.display(),
            around(&a).chars().take(2000).collect::<String>(),
            around(&b).chars().take(2000).collect::<String>()
        );
    }
}

async fn pods_of_job(env: &Env, job: &str) -> Vec<Pod> {
    let api: Api<Pod> = Api::namespaced(env.cp.client(), &env.ns);
    api.list(&ListParams::default().labels(&format!("batch.kubernetes.io/job-name={job}")))
        .await
        .unwrap()
        .items
}

/// Asserts that nothing of a split (shared staging, records) is left in `out`.
#[track_caller]
fn assert_nothing_left(out: &Path) {
    let left: Vec<String> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".ckpt-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// A Qwen3-MoE of 2 layers and 4 experts (`e2e/fixtures/tiny-qwen3-moe-config.json`)
/// at `dir`, in four shards.
fn tiny_moe(dir: &Path) {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../e2e/fixtures/tiny-qwen3-moe-config.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let config: Value = serde_json::from_str(&text).unwrap();
    let tensors = ckpt_convert::validate::expected::required_hf_bf16(&config).unwrap();
    ckpt_convert::synthetic::write_hf_tensors(dir, &text, &tensors, 128, 11, 40_000)
        .expect("write the MoE");
}

/// `workers` = 2, 3 and 7 publish what one pod publishes, both ways, and for a
/// dense and an MoE model (Megatron's
/// `.distcp` files and HF shards shared out by the parts), through an Indexed Job
/// whose every index ran once and a final step's Job; the parts' progress is in
/// the status, the sources are unchanged and nothing of the split is left.
#[tokio::test]
async fn a_split_run_publishes_what_one_pod_publishes() {
    let (env, mut op) = converting("split").await;
    tiny_moe(&env.claim("models").join("hf/Qwen3-MoE-tiny"));
    let lustre = env.claim("lustre-shared");
    let sources_before = (
        contents(&env.claim("models")),
        contents(&lustre.join("output/sft")),
    );
    let to_megatron = ("checkpoint_hf", "checkpoint_megatron");
    let to_hf = ("checkpoint_megatron", "checkpoint_hf");
    let hf = ("models", "hf/Llama-3.2-3B");
    let moe = ("models", "hf/Qwen3-MoE-tiny");
    let sft = ("lustre-shared", "output/sft/megatron_bridge/iter_0000100");
    let runs = [
        ("mg-1", to_megatron, hf, 1),
        ("mg-2", to_megatron, hf, 2),
        ("mg-3", to_megatron, hf, 3),
        // More parts than files: three have nothing to write.
        ("mg-7", to_megatron, hf, 7),
        ("hf-1", to_hf, sft, 1),
        ("hf-3", to_hf, sft, 3),
        // Experts shared out too.
        ("moe-1", to_megatron, moe, 1),
        ("moe-2", to_megatron, moe, 2),
        ("moe-3", to_megatron, moe, 3),
        ("moe-7", to_megatron, moe, 7),
    ];
    for (name, step, source, workers) in runs {
        env.kubectl(
            &["apply", "-f", "-"],
            &resource(&env.ns, name, step, source, workers),
        )
        .await
        .expect_ok(name);
    }
    let jobs: Api<Job> = Api::namespaced(env.cp.client(), &env.ns);
    for (name, _, _, workers) in runs {
        // Published: nothing is left for the finalizer to remove, and it goes
        // (right after the status says so).
        let cr = env
            .wait_for(
                name,
                "finished, without the finalizer",
                &mut [&mut op],
                |cr| finished(cr) && (!validated(cr) || cr.finalizers().is_empty()),
            )
            .await;
        assert!(validated(&cr), "{name}: {:#?}", cr.status);
        let st = cr.status.unwrap();
        if workers == 1 {
            assert!(st.parts.is_none(), "{name}: {:?}", st.parts);
            continue;
        }
        let parts = st.parts.expect("the parts in the status");
        assert_eq!((parts.workers, parts.done), (workers, workers), "{name}");
        assert!(parts.bytes.is_some_and(|b| b > 0), "{name}: {parts:?}");
        assert!(
            parts.failed.is_none() && parts.running.is_none(),
            "{parts:?}"
        );
        let slowest = parts.slowest.expect("the slowest part");
        assert!((0..workers).contains(&slowest.index) && slowest.seconds.is_some());
        let fin = format!("{name}-g1-finalize");
        assert_eq!(parts.finalize_job.as_deref(), Some(fin.as_str()));
        assert_eq!(st.job_name.as_deref(), Some(fin.as_str()));
        // The parts' Job is Indexed, each index ran once; then one final pod.
        let parts_job = jobs.get(&format!("{name}-g1")).await.unwrap();
        let spec = parts_job.spec.unwrap();
        assert_eq!(spec.completion_mode.as_deref(), Some("Indexed"));
        assert_eq!(spec.completions, Some(workers));
        let mut indexes: Vec<String> = pods_of_job(&env, &format!("{name}-g1"))
            .await
            .iter()
            .map(|p| p.labels()["batch.kubernetes.io/job-completion-index"].clone())
            .collect();
        indexes.sort();
        let want: Vec<String> = (0..workers).map(|i| i.to_string()).collect();
        assert_eq!(indexes, want, "{name}: one pod per part");
        assert_eq!(
            pods_of_job(&env, &fin).await.len(),
            1,
            "{name}: one final pod"
        );
        let reasons: Vec<String> = env
            .events_of(name)
            .await
            .iter()
            .filter_map(|e| e.reason.clone())
            .collect();
        for told in ["JobCreated", "PartsDone"] {
            assert_eq!(
                reasons.iter().filter(|r| *r == told).count(),
                1,
                "{name}: the parts' Job and the final step's: {reasons:?}"
            );
        }
        assert_eq!(
            reasons
                .iter()
                .filter(|r| *r == "ConversionSucceeded")
                .count(),
            1,
            "{name}: {reasons:?}"
        );
    }
    let out = lustre.join("output/convert");
    let megatron = |name: &str| out.join(name).join("iter_0000000");
    let distcp = std::fs::read_dir(megatron("mg-1"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "distcp")
        })
        .count();
    assert_eq!(distcp, 4, "four files to share out");
    for n in ["mg-2", "mg-3", "mg-7"] {
        assert_same(&out, "mg-1", n, "iter_0000000");
    }
    assert_same(&out, "hf-1", "hf-3", "");
    for n in ["moe-2", "moe-3", "moe-7"] {
        assert_same(&out, "moe-1", n, "iter_0000000");
    }
    // Validation took every tensor's bytes from the read-back of the process
    // that wrote them: one pod's own, or each part's.
    let note = |dir: PathBuf| {
        let text = std::fs::read(dir.join("ckpt-validation.json")).unwrap();
        let mut v: Value = serde_json::from_slice(&text).unwrap();
        ckpt_testcluster::take_read_back_note(&mut v)
    };
    for (name, sub) in [
        ("mg-1", "iter_0000000"),
        ("hf-1", ""),
        ("moe-1", "iter_0000000"),
        ("mg-3", "iter_0000000"),
        ("mg-7", "iter_0000000"),
        ("hf-3", ""),
        ("moe-2", "iter_0000000"),
        ("moe-3", "iter_0000000"),
        ("moe-7", "iter_0000000"),
    ] {
        let note = note(out.join(name).join(sub)).unwrap_or_else(|| panic!("{name}: no note"));
        let n: Vec<&str> = note.split_whitespace().collect();
        assert!(n.len() > 3 && n[0] == n[2] && n[0] != "0", "{name}: {note}");
    }
    // The shared staging and the parts' records went with the publish.
    assert_nothing_left(&out);
    assert_eq!(
        sources_before,
        (
            contents(&env.claim("models")),
            contents(&lustre.join("output/sft"))
        ),
        "a source changed"
    );
    op.stop();
}

/// A namespace with the fixtures, a node stand-in running the converter through
/// part gates ([`Gate::parts`]), and the operator.
async fn gated(prefix: &str) -> (Env, Gate, Operator) {
    let mut env = Env::new(prefix).await;
    env.needs_standin("holds and stops the parts' converter processes on the node");
    fixtures(&env);
    let gates = Gate::parts();
    gates.node(&mut env).await;
    let op = Operator::start(&env, prefix).await;
    (env, gates, op)
}

/// Deleting a split run while its parts run, one of them done and the others
/// not yet written: the parts' Job and pods go (the node tells them to stop), a
/// Job of the operator removes the staging they shared, and only then does the
/// resource go. Nothing is published, nothing of the split is left, the source
/// is unchanged.
#[tokio::test]
async fn deleting_a_split_run_mid_run_publishes_nothing_and_leaves_no_staging_on_the_stand_in() {
    let (env, gates, mut op) = gated("split-deleted").await;
    let source = env.claim("models");
    let before = contents(&source);
    env.kubectl(
        &["apply", "-f", "-"],
        &resource(
            &env.ns,
            "gone",
            ("checkpoint_hf", "checkpoint_megatron"),
            ("models", "hf/Llama-3.2-3B"),
            3,
        ),
    )
    .await
    .expect_ok("applying the split conversion");
    let target = env.claim("lustre-shared").join("output/convert/gone");
    let record = target.join(".iter_0000000.ckpt-staging-split/.ckpt-split/part-0-of-3.json");
    // Part 0 writes its share; parts 1 and 2 run, held at their gates.
    gates.open("open-0");
    let done = Waiting::new("part 0 to complete");
    while !record.is_file() || env.runs().len() < 3 {
        op.assert_running();
        done.tick(|| format!("{:#?}", env.runs())).await;
    }
    assert!(!published(&target));
    let gone = env.get("gone").await;
    assert!(
        gone.finalizers()
            .iter()
            .any(|f| f == "ckpt.dev/split-staging"),
        "{:?}",
        gone.metadata.finalizers
    );
    env.kubectl(
        &[
            "delete",
            "checkpointconversion",
            "gone",
            "-n",
            &env.ns,
            "--wait=false",
        ],
        "",
    )
    .await
    .expect_ok("deleting the resource");
    let api = env.api().await;
    let waiting = Waiting::new("the resource to go after its staging");
    while api.get_opt("gone").await.unwrap().is_some() {
        op.assert_running();
        waiting
            .tick(|| format!("{:#?}\n{}", env.runs(), op.log()))
            .await;
    }
    let runs = env.runs();
    let parts: Vec<_> = runs
        .iter()
        .filter(|r| r.job.as_deref() == Some("gone-g1"))
        .collect();
    assert_eq!(parts.len(), 3, "{runs:#?}");
    assert_eq!(
        parts.iter().filter(|r| r.exit_code == Some(0)).count(),
        1,
        "{parts:#?}"
    );
    assert_eq!(
        parts
            .iter()
            .filter(|r| r.end.as_deref() == Some("Deleted"))
            .count(),
        2,
        "{parts:#?}"
    );
    assert!(
        runs.iter().all(|r| !r.pod.starts_with("gone-g1-finalize")),
        "the final step ran: {runs:#?}"
    );
    let clean: Vec<_> = runs
        .iter()
        .filter(|r| r.pod_argv.get(1).is_some_and(|a| a == "clean"))
        .collect();
    assert_eq!(clean.len(), 1, "{runs:#?}");
    assert_eq!(clean[0].pod_argv[2], "/data/target/gone");
    assert_eq!(clean[0].exit_code, Some(0), "{:#?}", clean[0]);
    let left: Vec<String> = [target.clone(), target.parent().unwrap().to_owned()]
        .iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flatten()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".ckpt-"))
        .collect();
    assert!(
        left.is_empty(),
        "left behind: {left:?}; the cleanup said: {}",
        clean[0].output
    );
    assert!(!published(&target), "a deleted split run published");
    let told: Vec<String> = env
        .events_of("gone")
        .await
        .iter()
        .filter_map(|e| e.reason.clone())
        .collect();
    assert!(told.iter().any(|r| r == "StagingRemoved"), "{told:?}");
    assert_eq!(contents(&source), before, "a source changed");
    op.stop();
}

/// A part killed while it runs is run again alone (the Indexed Job's retries are
/// per index), and the conversion still publishes what one pod publishes. The
/// kill comes mid-write, after part 1's first piece is in the shared staging.
#[tokio::test]
async fn a_killed_part_is_run_again_alone_on_the_stand_in() {
    let (env, gates, mut op) = gated("split-killed").await;
    let hf = ("models", "hf/Llama-3.2-3B");
    let to_megatron = ("checkpoint_hf", "checkpoint_megatron");
    for (name, workers) in [("one", 1), ("three", 3)] {
        env.kubectl(
            &["apply", "-f", "-"],
            &resource(&env.ns, name, to_megatron, hf, workers),
        )
        .await
        .expect_ok(name);
    }
    // Part 1's first process is killed mid-write: after its first piece is in the
    // shared staging (the converter's pause failpoint holds it there).
    gates.pause_mid_write(1);
    for i in 0..3 {
        gates.open(&format!("open-{i}"));
    }
    let part = |r: &ckpt_testcluster::Run, i: &str| {
        r.job.as_deref() == Some("three-g1") && r.pod.starts_with(&format!("three-g1-{i}-"))
    };
    let paused = Waiting::new("part 1 to pause after its first piece");
    let victim = loop {
        if let Some(pid) = gates.paused(1) {
            break pid;
        }
        paused
            .tick(|| {
                format!(
                    "(the node's converter, CKPT_CONVERT_BIN, needs the failpoints feature: run-tests.sh gives the stand-in the test image's build; by hand, cargo build --release -p ckpt-convert --features failpoints)\n{:#?}",
                    env.runs()
                )
            })
            .await;
    };
    let staging = env
        .claim("lustre-shared")
        .join("output/convert/three/.iter_0000000.ckpt-staging-split");
    assert!(
        std::fs::read_dir(&staging).unwrap().any(|e| e
            .unwrap()
            .path()
            .extension()
            .is_some_and(|x| x == "distcp")),
        "part 1 wrote nothing before its pause"
    );
    // SAFETY: kills a process this test's node stand-in started.
    unsafe {
        libc::kill(victim, libc::SIGKILL);
    }
    for name in ["one", "three"] {
        env.wait_for(name, "Succeeded and Validated", &mut [&mut op], validated)
            .await;
    }
    let runs = env.runs();
    for (i, n) in [("0", 1), ("1", 2), ("2", 1)] {
        assert_eq!(
            runs.iter().filter(|r| part(r, i)).count(),
            n,
            "part {i}: {runs:#?}"
        );
    }
    let cr = env.get("three").await;
    let st = cr.status.unwrap();
    assert_eq!(
        st.failed_attempts, None,
        "the final step's Job failed no pod"
    );
    assert_eq!(st.parts.map(|p| (p.done, p.failed)), Some((3, None)));
    let out = env.claim("lustre-shared").join("output/convert");
    assert_same(&out, "one", "three", "iter_0000000");
    op.stop();
}

/// Both merge examples with `workers: 3` publish what they publish with one pod
/// (the PEFT merge's HF output; the Megatron-Bridge merge's Megatron checkpoint
/// and HF export), each part probing the merged tensors it wrote.
#[tokio::test]
async fn split_merges_publish_what_one_pod_publishes_on_the_stand_in() {
    let mut env = Env::new("split-merge").await;
    fixtures(&env);
    crate::support::lora_fixtures(&env);
    env.start_node().await;
    let mut op = Operator::start(&env, "split-merge").await;
    // Each example under the names `NAME-N`, its outputs named after it.
    let named = |file: &str, name: &str, workers: i32| {
        let text = env.example(file);
        let text = match file {
            "merge-lora-hf-peft.yaml" => text
                .replace("name: peft-merge", &format!("name: {name}"))
                .replace(
                    "output/convert/peft-merged-hf",
                    &format!("output/convert/{name}"),
                ),
            _ => text
                .replace("name: sft-lora-merge", &format!("name: {name}"))
                .replace(
                    "output/convert/sft-lora-merged-hf",
                    &format!("output/convert/{name}"),
                )
                .replace(
                    "output/convert/sft-lora-merged-megatron",
                    &format!("output/convert/{name}-mg"),
                ),
        };
        assert!(text.contains(&format!("output/convert/{name}")), "{text}");
        format!("{}\n  workers: {workers}\n", text.trim_end())
    };
    let runs = [
        ("merge-lora-hf-peft.yaml", "peft-1", 1),
        ("merge-lora-hf-peft.yaml", "peft-3", 3),
        ("merge-lora-megatron-bridge.yaml", "bridge-1", 1),
        ("merge-lora-megatron-bridge.yaml", "bridge-3", 3),
    ];
    for (file, name, workers) in runs {
        env.kubectl(&["apply", "-f", "-"], &named(file, name, workers))
            .await
            .expect_ok(name);
    }
    for (_, name, workers) in runs {
        let cr = env
            .wait_for(name, "Succeeded and Validated", &mut [&mut op], validated)
            .await;
        let st = cr.status.unwrap();
        assert_eq!(
            st.parts.as_ref().map(|p| (p.workers, p.done)),
            (workers > 1).then_some((workers, workers)),
            "{name}"
        );
    }
    let out = env.claim("lustre-shared").join("output/convert");
    assert_same(&out, "peft-1", "peft-3", "");
    assert_same(&out, "bridge-1", "bridge-3", "");
    assert_same(&out, "bridge-1-mg", "bridge-3-mg", "iter_0000000");
    // The merge's smoke test is the probe of every merged tensor, the parts'.
    for dir in ["peft-3", "bridge-3", "bridge-3-mg/iter_0000000"] {
        let text = std::fs::read(out.join(dir).join("ckpt-validation.json")).unwrap();
        let v: Value = serde_json::from_slice(&text).unwrap();
        assert_eq!(v["smoke_test"]["kind"], "lora_probe", "{dir}: {v:#}");
        assert_eq!(v["smoke_test"]["status"], "passed", "{dir}: {v:#}");
        assert!(v["smoke_test"]["probe"]["tensors"].as_u64().unwrap() > 0);
    }
    assert_nothing_left(&out);
    op.stop();
}
