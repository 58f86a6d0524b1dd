//! CRDs: a structural v1 CRD becomes Established and serves objects; deleting a
//! namespace (with a custom object in it) finishes.

use anyhow::Result;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use kube::runtime::wait::{await_condition, conditions};

use crate::util::{World, wait};

#[tokio::test]
async fn crd_is_established_and_namespace_deletion_finishes() -> Result<()> {
    let w = World::new("crd", |c| c).await?;
    let crd: CustomResourceDefinition = serde_json::from_value(serde_json::json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.testcluster.ckpt.dev"},
        "spec": {
            "group": "testcluster.ckpt.dev",
            "names": {"kind": "Widget", "plural": "widgets", "singular": "widget"},
            "scope": "Namespaced",
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                    "spec": {"type": "object", "properties": {"size": {"type": "integer", "minimum": 1}}}
                }}},
            }],
        },
    }))?;
    let crds: Api<CustomResourceDefinition> = Api::all(w.client.clone());
    let name = "widgets.testcluster.ckpt.dev";
    crds.patch(
        name,
        &PatchParams::apply("ckpt-testcluster").force(),
        &Patch::Apply(&crd),
    )
    .await?;
    tokio::time::timeout(
        wait(),
        await_condition(crds.clone(), name, conditions::is_crd_established()),
    )
    .await??;

    // It serves objects, validated by its schema.
    let gvk = GroupVersionKind::gvk("testcluster.ckpt.dev", "v1", "Widget");
    let widgets: Api<DynamicObject> =
        Api::namespaced_with(w.client.clone(), &w.ns, &ApiResource::from_gvk(&gvk));
    let mut obj = DynamicObject::new("w1", &ApiResource::from_gvk(&gvk));
    obj.data = serde_json::json!({"spec": {"size": 3}});
    widgets.create(&PostParams::default(), &obj).await?;
    let mut bad = DynamicObject::new("w2", &ApiResource::from_gvk(&gvk));
    bad.data = serde_json::json!({"spec": {"size": 0}});
    let err = widgets
        .create(&PostParams::default(), &bad)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("spec.size"), "{err}");

    // The namespace controller deletes the namespace and what is in it.
    let namespaces: Api<Namespace> = Api::all(w.client.clone());
    let uid = namespaces
        .get(&w.ns)
        .await?
        .metadata
        .uid
        .unwrap_or_default();
    namespaces
        .delete(&w.ns, &DeleteParams::background())
        .await?;
    tokio::time::timeout(
        wait(),
        await_condition(namespaces, &w.ns, conditions::is_deleted(&uid)),
    )
    .await??;
    crds.delete(name, &DeleteParams::default()).await?;
    assert!(w.standin.take_errors().is_empty());
    Ok(())
}
