//! An owned real node (not the shared one) runs pods, and dropping it leaves
//! nothing on the machine: no process (containerd, kubelet, shims, containers),
//! no mount, no bridge, no cgroup, no temp dir, and the kernel settings the
//! kubelet changed are restored. Its own test binary, with its own control
//! plane, so that it cannot disturb the shared node of `tests/node`.
//!
//! Needs what `tests/node` needs, except the converter image: its pods run the
//! pause image, the one image every node has.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::PostParams;

use ckpt_testcluster::{ControlPlane, ControlPlaneOptions, PAUSE_IMAGE, RealNode, RealNodeOptions};

fn pause_pod(name: &str, args: &[&str]) -> Result<Pod> {
    Ok(serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": false,
            "containers": [{
                "name": "main",
                "image": PAUSE_IMAGE,
                "imagePullPolicy": "Never",
                "command": ["/pause"],
                "args": args,
            }],
        },
    }))?)
}

async fn wait_phase(pods: &Api<Pod>, name: &str, phase: &str, node: &RealNode) -> Result<Pod> {
    let start = Instant::now();
    loop {
        let pod = pods.get(name).await?;
        let now = pod.status.as_ref().and_then(|s| s.phase.clone());
        if now.as_deref() == Some(phase) {
            return Ok(pod);
        }
        if start.elapsed() > ckpt_testcluster::test_deadline() {
            bail!(
                "pod {name} not {phase} (is {now:?}): {:#?}\nkubelet log:\n{}",
                pod.status,
                node.log_tail("kubelet", 40)
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn sysctl(key: &str) -> String {
    std::fs::read_to_string(Path::new("/proc/sys").join(key))
        .unwrap_or_default()
        .trim()
        .to_string()
}

#[tokio::test]
async fn an_owned_node_runs_pods_and_leaves_nothing_behind() -> Result<()> {
    let sysctls = [
        "vm/overcommit_memory",
        "kernel/panic",
        "kernel/panic_on_oops",
    ];
    let before: Vec<String> = sysctls.iter().map(|k| sysctl(k)).collect();
    let cp = ControlPlane::start(ControlPlaneOptions::for_real_node()).await?;
    let t0 = Instant::now();
    let node = RealNode::start(&cp, RealNodeOptions::default()).await?;
    eprintln!("node Ready in {:?}", t0.elapsed());
    let ns = cp.new_namespace("lifecycle").await?;
    let pods: Api<Pod> = Api::namespaced(cp.client(), &ns);

    // One pod that finishes, one that runs until the node goes away.
    pods.create(&PostParams::default(), &pause_pod("once", &["-v"])?)
        .await?;
    pods.create(&PostParams::default(), &pause_pod("forever", &[])?)
        .await?;
    let done = wait_phase(&pods, "once", "Succeeded", &node).await?;
    let status = done.status.unwrap_or_default();
    let term = status.container_statuses.unwrap_or_default()[0]
        .state
        .as_ref()
        .and_then(|s| s.terminated.clone());
    assert_eq!(term.map(|t| t.exit_code), Some(0));
    wait_phase(&pods, "forever", "Running", &node).await?;
    let cgroup_pids = node.leftovers();
    assert!(
        cgroup_pids.iter().any(|l| l.starts_with("processes")),
        "a running node shows its processes: {cgroup_pids:?}"
    );

    let dir = node.dir().to_path_buf();
    let pids = node.pids();
    let t1 = Instant::now();
    drop(node);
    eprintln!("node stopped in {:?}", t1.elapsed());
    for (name, pid) in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "{name} (pid {pid}) survived"
        );
    }
    let left = RealNode::leftovers_of(&dir);
    assert!(left.is_empty(), "left behind: {left:?}");
    assert!(!dir.exists(), "{} was not removed", dir.display());
    let after: Vec<String> = sysctls.iter().map(|k| sysctl(k)).collect();
    assert_eq!(before, after, "sysctls {sysctls:?} not restored");
    drop(cp);
    Ok(())
}
