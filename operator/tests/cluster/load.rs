//! Load (issue 11): 200 resources applied at once, half in one namespace and half
//! spread over four more, to one operator watching the five. It runs at most
//! `--reconcile-concurrency` reconciles at a time, creates Jobs no faster than
//! `--jobs-per-second`, stays well under the chart's memory limit, and every
//! resource ends Succeeded and Validated. The figures are printed (run with
//! `--nocapture` to see them).
//!
//! On a control plane of its own, so that 200 resources, Jobs and pods do not slow
//! the other tests' apiserver; the node stand-in runs the real converter on the
//! tiny fixture checkpoint (a few tens of milliseconds each).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ckpt_operator::api::CheckpointConversion;
use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, ListParams};

use crate::support::{Env, Operator, PrivateControlPlane, Waiting, fixtures, phase, validated};

const RESOURCES: usize = 200;
/// How many of them go to the release's own namespace; the rest are spread evenly
/// over [`OTHER_NAMESPACES`] more.
const IN_ONE_NAMESPACE: usize = 100;
const OTHER_NAMESPACES: usize = 4;
const JOBS_PER_SECOND: f64 = 10.0;
const CONCURRENCY: i64 = 4;
/// The chart's memory limit of the operator container (values.yaml).
const CHART_MEMORY_LIMIT: u64 = 256 << 20;

fn manifest(ns: &str, i: usize) -> String {
    format!(
        "apiVersion: ckpt.dev/v1alpha1
kind: CheckpointConversion
metadata:
  name: load-{i:03}
  namespace: {ns}
spec:
  source: {{kind: checkpoint_megatron, pvc: lustre-shared, path: output/sft/megatron_bridge/iter_0000100}}
  target: {{kind: checkpoint_hf, pvc: lustre-shared, path: output/load/{ns}/load-{i:03}}}
  baseModel: {{pvc: models, path: hf/Llama-3.2-3B}}
"
    )
}

/// `VmRSS` and `VmHWM` (peak) of `pid`, in bytes.
fn memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The operator's metric `name` (a counter's `_total`, or a gauge), from /metrics.
async fn metric(port: u16, name: &str) -> i64 {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("the metrics port");
    tokio::io::AsyncWriteExt::write_all(
        &mut s,
        b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n",
    )
    .await
    .unwrap();
    let mut body = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut s, &mut body)
        .await
        .unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("ckpt_operator_{name} ")))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no ckpt_operator_{name} in:\n{body}")) as i64
}

/// The most Jobs created within any `window` seconds, from their creation times
/// (whole seconds: Jobs stamped `t .. t+window-1` were created within `window`
/// seconds).
fn most_within(created: &[i64], window: i64) -> usize {
    created
        .iter()
        .map(|t| {
            created
                .iter()
                .filter(|u| **u >= *t && **u < t + window)
                .count()
        })
        .max()
        .unwrap_or(0)
}

#[tokio::test]
async fn two_hundred_resources_at_once_are_paced_bounded_and_all_finish_on_the_stand_in() {
    let private = PrivateControlPlane::start().await;
    let cp = private.get();
    let mut others = Vec::new();
    for _ in 0..OTHER_NAMESPACES {
        others.push(cp.new_namespace("load-other").await.unwrap());
    }
    let watch = format!("watchNamespaces={{$NS,{}}}", others.join(","));
    let mut env = Env::on(cp, "load", &[watch.as_str()]).await;
    env.needs_standin("runs 200 conversions on the node stand-in");
    fixtures(&env);
    for ns in &others {
        env.create_claims(ns, &["lustre-shared", "models"]).await;
    }
    let mut node = env.node_config();
    node.namespace = None;
    env.start_node_with(node).await;
    let mut op = Operator::start_with(
        &env,
        "load",
        &[
            &format!("--jobs-per-second={JOBS_PER_SECOND}"),
            &format!("--reconcile-concurrency={CONCURRENCY}"),
            "--metrics-addr=127.0.0.1:0",
        ],
    )
    .await;
    let mut placed: Vec<(String, usize)> =
        (0..IN_ONE_NAMESPACE).map(|i| (env.ns.clone(), i)).collect();
    for i in IN_ONE_NAMESPACE..RESOURCES {
        placed.push((others[i % OTHER_NAMESPACES].clone(), i));
    }
    let all: Vec<String> = placed.iter().map(|(ns, i)| manifest(ns, *i)).collect();
    // Wait for the operator to serve (the port the kernel gave it) before the
    // clock starts.
    let waiting = Waiting::new("the operator's metrics port");
    let port = loop {
        if let Some(port) = op.listening_port() {
            break port;
        }
        op.assert_running();
        waiting.tick(|| op.log()).await;
    };
    let (idle_rss, _) = memory(op.pid());
    let started = Instant::now();
    env.kubectl(&["apply", "-f", "-"], &all.join("---\n"))
        .await
        .expect_ok("applying 200 resources at once");
    let applied = started.elapsed();

    let namespaces: Vec<String> = std::iter::once(env.ns.clone())
        .chain(others.clone())
        .collect();
    let mut samples: Vec<(Duration, u64)> = Vec::new();
    let waiting = Waiting::new("200 resources in a terminal phase");
    let finished = loop {
        op.assert_running();
        samples.push((started.elapsed(), memory(op.pid()).0));
        let mut crs: Vec<CheckpointConversion> = Vec::new();
        for ns in &namespaces {
            let api: Api<CheckpointConversion> = Api::namespaced(cp.client(), ns);
            crs.extend(api.list(&ListParams::default()).await.unwrap().items);
        }
        let terminal = crs
            .iter()
            .filter(|cr| matches!(phase(cr), Some("Succeeded" | "Failed" | "Rejected")))
            .count();
        if terminal == RESOURCES {
            break crs;
        }
        let phases: BTreeMap<String, usize> = crs.iter().fold(BTreeMap::new(), |mut m, cr| {
            *m.entry(phase(cr).unwrap_or("-").to_owned()).or_default() += 1;
            m
        });
        waiting
            .tick(|| format!("{terminal} terminal; phases {phases:?}"))
            .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let elapsed = started.elapsed();
    let (end_rss, peak_rss) = memory(op.pid());

    let not_done: Vec<String> = finished
        .iter()
        .filter(|cr| !validated(cr))
        .map(|cr| format!("{}: {:?}", kube::ResourceExt::name_any(cr), cr.status))
        .collect();
    assert!(
        not_done.is_empty(),
        "not Succeeded and Validated: {not_done:#?}"
    );

    let mut created: Vec<i64> = Vec::new();
    for ns in &namespaces {
        let api: Api<Job> = Api::namespaced(cp.client(), ns);
        for j in api.list(&ListParams::default()).await.unwrap().items {
            let t = j.metadata.creation_timestamp.expect("created").0;
            created.push(t.as_second());
        }
    }
    assert_eq!(created.len(), RESOURCES, "one Job per resource");
    created.sort_unstable();
    // The stamps are when the apiserver stored each Job: creations sent on their
    // slots may arrive up to a second late on a loaded machine and bunch with the
    // next second's, so each window allows one second more (unpaced, all 200 would
    // land within a second or two).
    for window in [1, 2, 5, 10] {
        let most = most_within(&created, window);
        let allowed = (JOBS_PER_SECOND * (window + 1) as f64).ceil() as usize + 1;
        assert!(
            most <= allowed,
            "{most} Jobs created within {window} s; at most {allowed} allowed at {JOBS_PER_SECOND}/s"
        );
    }
    let span = (created[created.len() - 1] - created[0] + 1) as f64;
    let rate = RESOURCES as f64 / span;

    let peak = metric(port, "reconciles_running_peak").await;
    assert!(
        (1..=CONCURRENCY).contains(&peak),
        "{peak} reconciles ran at once, allowed {CONCURRENCY}"
    );
    assert_eq!(metric(port, "jobs_created_total").await, RESOURCES as i64);
    assert_eq!(metric(port, "jobs_waiting").await, 0);
    let reconciles = metric(port, "reconciles_total").await;

    assert!(
        peak_rss < CHART_MEMORY_LIMIT,
        "peak RSS {} MiB, over the chart's limit",
        peak_rss >> 20
    );
    // Flat: the second half of the run adds little to what the first half reached.
    let half = samples
        .iter()
        .filter(|(t, _)| *t <= elapsed / 2)
        .map(|(_, r)| *r)
        .max()
        .unwrap_or(idle_rss);
    let max = samples.iter().map(|(_, r)| *r).max().unwrap_or(idle_rss);
    assert!(
        max <= half + (32 << 20),
        "RSS grew from {} MiB (first half) to {} MiB",
        half >> 20,
        max >> 20
    );
    eprintln!(
        "load: {RESOURCES} resources ({IN_ONE_NAMESPACE} in one namespace, the rest over \
         {OTHER_NAMESPACES} more) applied in {applied:.1?}, all terminal after {elapsed:.1?}; \
         Jobs created at {rate:.1}/s (limit {JOBS_PER_SECOND}/s, {} s from first to last); \
         {reconciles} reconciles, at most {peak} at once (limit {CONCURRENCY}); operator RSS \
         idle {} MiB, first half max {} MiB, max {} MiB, end {} MiB, peak (VmHWM) {} MiB",
        span,
        idle_rss >> 20,
        half >> 20,
        max >> 20,
        end_rss >> 20,
        peak_rss >> 20
    );
    op.stop();
}
