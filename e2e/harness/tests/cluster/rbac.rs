//! A ServiceAccount client has exactly the permissions RBAC grants it.

use anyhow::Result;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::Api;
use kube::api::{ListParams, PostParams};

use crate::util::World;

#[tokio::test]
async fn service_account_token_is_subject_to_rbac() -> Result<()> {
    let w = World::new("rbac", |c| c).await?;
    let sa = w.cp.client_for_service_account(&w.ns, "reader").await?;
    let jobs: Api<Job> = Api::namespaced(sa, &w.ns);
    match jobs.list(&ListParams::default()).await {
        Err(kube::Error::Api(s)) if s.code == 403 => {}
        other => panic!("expected 403 before any grant, got {other:?}"),
    }

    let role: Role = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "job-reader"},
        "rules": [{"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list", "watch"]}],
    }))?;
    let binding: RoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "job-reader"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "job-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": w.ns}],
    }))?;
    Api::<Role>::namespaced(w.client.clone(), &w.ns)
        .create(&PostParams::default(), &role)
        .await?;
    Api::<RoleBinding>::namespaced(w.client.clone(), &w.ns)
        .create(&PostParams::default(), &binding)
        .await?;
    w.eventually("the RoleBinding takes effect", || async {
        Ok(jobs.list(&ListParams::default()).await.is_ok())
    })
    .await?;
    // Still nothing beyond the grant.
    let other: Api<Job> = Api::namespaced(jobs.into_client(), "default");
    match other.list(&ListParams::default()).await {
        Err(kube::Error::Api(s)) if s.code == 403 => {}
        res => panic!("expected 403 in another namespace, got {res:?}"),
    }

    // kubectl works with the admin kubeconfig.
    let out =
        w.cp.kubectl([
            "-n",
            &w.ns,
            "get",
            "rolebinding",
            "job-reader",
            "-o",
            "name",
        ])
        .await?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "rolebinding.rbac.authorization.k8s.io/job-reader"
    );
    assert!(w.standin.take_errors().is_empty());
    Ok(())
}
