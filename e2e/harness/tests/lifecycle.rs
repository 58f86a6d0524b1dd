//! An owned control plane (not the shared one) stops on drop: every process
//! gone, temp dir removed. Its own test binary, so its start is not
//! measured against the shared cluster's tests.

use std::path::Path;
use std::time::Instant;

use ckpt_testcluster::{ControlPlane, ControlPlaneOptions};

#[tokio::test]
async fn owned_control_plane_stops_on_drop() -> anyhow::Result<()> {
    let t0 = Instant::now();
    let cp = ControlPlane::start(ControlPlaneOptions {
        keep: false,
        ..Default::default()
    })
    .await?;
    let started = t0.elapsed();
    let pids = cp.pids();
    let names: Vec<&str> = pids.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["etcd", "kube-apiserver", "kube-controller-manager"]);
    let dir = cp.dir().to_path_buf();
    assert!(cp.kubeconfig_path().is_file());
    let version = cp.client().apiserver_version().await?;
    assert_eq!(version.git_version, "v1.37.2");

    let t1 = Instant::now();
    drop(cp);
    eprintln!("started in {started:?}, stopped in {:?}", t1.elapsed());
    for (name, pid) in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "{name} (pid {pid}) survived"
        );
    }
    assert!(!dir.exists(), "{} was not removed", dir.display());
    Ok(())
}
