//! The node itself: registered, Ready, the pinned kubelet on containerd.

use anyhow::Result;
use serde_json::Value;

use crate::util::World;

#[tokio::test]
async fn kubectl_shows_a_ready_node_running_the_pinned_kubelet_on_containerd() -> Result<()> {
    let w = World::new("node-ready").await?;
    let table = w.cp.kubectl(["get", "nodes", "-o", "wide"]).await?;
    eprintln!("{}", String::from_utf8_lossy(&table.stdout));
    let out = w.cp.kubectl(["get", "nodes", "-o", "json"]).await?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: Value = serde_json::from_slice(&out.stdout)?;
    let items = list["items"].as_array().cloned().unwrap_or_default();
    assert_eq!(items.len(), 1, "{list:#}");
    let node = &items[0];
    assert_eq!(node["metadata"]["name"], w.node.name());
    let info = &node["status"]["nodeInfo"];
    assert_eq!(info["kubeletVersion"], "v1.37.2", "{info:#}");
    assert!(
        info["containerRuntimeVersion"]
            .as_str()
            .is_some_and(|v| v.starts_with("containerd://")),
        "{info:#}"
    );
    let ready = node["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "Ready");
    assert_eq!(
        ready.map(|c| c["status"].clone()),
        Some(Value::from("True")),
        "{:#}",
        node["status"]["conditions"]
    );
    // The node lifecycle controller lifted the not-ready taint every new Node gets.
    let taints = node["spec"]["taints"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(taints.is_empty(), "{taints:#?}");
    // Both images were imported into the namespace the kubelet uses.
    let images = w.node.ctr(&["images", "list", "--quiet"])?;
    let images = String::from_utf8_lossy(&images.stdout);
    for image in [&w.images.converter.reference, &w.images.operator.reference] {
        assert!(
            images.lines().any(|l| l == image),
            "{image} not in:\n{images}"
        );
    }
    Ok(())
}
