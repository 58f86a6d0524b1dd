//! The Helm chart `charts/ckpt-operator`: its CRD is `crds/` verbatim, it lints (also
//! `--strict`), its schema refuses wrong types and unknown keys, it renders what the
//! operator's flags expect, the rendered manifests pass a server-side dry run against the
//! real kube-apiserver, and a real `helm install` creates an established CRD, RBAC with
//! exactly the verbs the operator uses in exactly the namespaces it watches (a
//! cluster-wide role only when asked for), and ServiceAccounts under which the operator
//! binary starts, leads, and creates a conversion Job without a single denied call.

use std::collections::BTreeSet;

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, PolicyRule, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, PostParams};
use serde::Deserialize;
use serde_json::{Value, json};

use ckpt_testcluster::{IMAGE_USER, NodeKind, RealNode, chown_tree};

use crate::support::{
    CRD_NAME, CRD_NAMESPACE, CRD_RELEASE, Run, Waiting, chart_dir as chart, cp, crd_installed,
    fixtures_in, helm_local as helm_template, kubectl, node_kind, root, validated,
};

const CRD_FILE: &str = "crds/checkpointconversions.ckpt.dev.yaml";
const CRD_TEMPLATE: &str =
    "charts/ckpt-operator/templates/crds/checkpointconversions.ckpt.dev.yaml";
const RELEASE: &str = "ckpt-operator";

fn read(rel: &str) -> String {
    let path = root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The (apiGroup, resource, verb) triples the operator's Roles (or ClusterRole) must
/// grant: exactly what operator/src calls.
fn operator_permissions() -> BTreeSet<(String, String, String)> {
    let mut set = BTreeSet::new();
    for (group, resource, verbs) in [
        (
            "ckpt.dev",
            "checkpointconversions",
            &["get", "list", "watch", "patch"][..],
        ),
        ("ckpt.dev", "checkpointconversions/status", &["patch"]),
        ("ckpt.dev", "checkpointconversions/finalizers", &["update"]),
        (
            "batch",
            "jobs",
            &["get", "list", "watch", "create", "delete"],
        ),
        ("", "pods", &["list", "watch"]),
        ("", "events", &["list", "watch"]),
        ("", "persistentvolumeclaims", &["get"]),
        (
            "coordination.k8s.io",
            "leases",
            &["get", "create", "update", "delete"],
        ),
        ("events.k8s.io", "events", &["create", "patch"]),
    ] {
        for verb in verbs {
            set.insert((group.to_owned(), resource.to_owned(), (*verb).to_owned()));
        }
    }
    set
}

fn lease_permissions() -> BTreeSet<(String, String, String)> {
    ["get", "create", "patch"]
        .iter()
        .map(|v| ("coordination.k8s.io".into(), "leases".into(), (*v).into()))
        .collect()
}

/// Flattens rules into triples; refuses what would widen them (resourceNames aside,
/// wildcards, non-resource URLs).
fn triples(rules: &[PolicyRule]) -> BTreeSet<(String, String, String)> {
    let mut set = BTreeSet::new();
    for r in rules {
        assert!(r.non_resource_urls.is_none(), "unexpected rule {r:?}");
        assert!(r.resource_names.is_none(), "unexpected rule {r:?}");
        for g in r.api_groups.as_deref().unwrap_or_default() {
            for res in r.resources.as_deref().unwrap_or_default() {
                for v in &r.verbs {
                    assert!(g != "*" && res != "*" && v != "*", "wildcard in {r:?}");
                    set.insert((g.clone(), res.clone(), v.clone()));
                }
            }
        }
    }
    set
}

async fn helm(args: &[&str]) -> Run {
    helm_template(args).await
}

/// `helm template` of the chart as release `RELEASE` in `namespace`, parsed.
async fn render(namespace: &str, sets: &[&str]) -> Vec<Value> {
    let mut extra = Vec::new();
    for s in sets {
        extra.extend(["--set", s]);
    }
    render_with(namespace, &extra).await
}

/// The values file with every optional value set.
fn all_values() -> String {
    root()
        .join("charts/ckpt-operator/ci/all-values.yaml")
        .display()
        .to_string()
}

/// `helm template` of the chart as release `RELEASE` in `namespace` with `extra` helm
/// arguments, parsed.
async fn render_with(namespace: &str, extra: &[&str]) -> Vec<Value> {
    let chart = chart();
    let mut args = vec!["template", RELEASE, &chart, "--namespace", namespace];
    args.extend_from_slice(extra);
    let yaml = helm(&args)
        .await
        .expect_ok(&format!("helm {}", args.join(" ")));
    parse_docs(&yaml)
}

fn parse_docs(yaml: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|d| Value::deserialize(d).expect("helm renders YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in {:#?}", kinds(docs)))
}

fn find_in<'a>(docs: &'a [Value], kind: &str, namespace: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| {
            d["kind"] == kind
                && d["metadata"]["name"] == name
                && d["metadata"]["namespace"] == namespace
        })
        .unwrap_or_else(|| panic!("no {kind} {namespace}/{name} in {:#?}", kinds(docs)))
}

fn kinds(docs: &[Value]) -> Vec<String> {
    let mut v: Vec<String> = docs
        .iter()
        .map(|d| {
            format!(
                "{} {}/{}",
                d["kind"].as_str().unwrap_or("?"),
                d["metadata"]["namespace"].as_str().unwrap_or("-"),
                d["metadata"]["name"].as_str().unwrap_or("?")
            )
        })
        .collect();
    v.sort();
    v
}

fn deployment(docs: &[Value]) -> &Value {
    let mut all = docs.iter().filter(|d| d["kind"] == "Deployment");
    let d = all.next().expect("a Deployment");
    assert!(all.next().is_none(), "one Deployment");
    d
}

fn operator_container(docs: &[Value]) -> &Value {
    &deployment(docs)["spec"]["template"]["spec"]["containers"][0]
}

fn args_of(docs: &[Value]) -> Vec<String> {
    operator_container(docs)["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("string arg").to_owned())
        .collect()
}

fn rules_of(doc: &Value) -> BTreeSet<(String, String, String)> {
    let rules: Vec<PolicyRule> = serde_json::from_value(doc["rules"].clone()).expect("rules");
    triples(&rules)
}

// ---------------------------------------------------------------------------------------
// Without a control plane

#[test]
fn the_chart_crd_is_the_checked_in_crd() {
    let crd = read(CRD_FILE);
    let template = read(CRD_TEMPLATE);
    assert!(
        !crd.contains("{{"),
        "{CRD_FILE} contains '{{{{', which Helm would read as a template action"
    );
    // The wrapper lines are exactly those with a template action.
    let stripped: String = template
        .lines()
        .filter(|l| !l.contains("{{"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(
        stripped == crd,
        "{CRD_TEMPLATE} is out of date with {CRD_FILE}: run charts/ckpt-operator/sync-crds.sh \
         (after `cargo run -p ckpt-operator --bin crdgen > {CRD_FILE}` if the types changed)"
    );
    let wrapper: Vec<&str> = template.lines().filter(|l| l.contains("{{")).collect();
    assert_eq!(
        wrapper.len(),
        4,
        "expected the comment, `if .Values.crds.install`, the metadata include and `end`: {wrapper:#?}"
    );
    assert!(wrapper[1].contains(".Values.crds.install"), "{wrapper:#?}");
    assert!(
        wrapper[2].contains("ckpt-operator.crdMetadata"),
        "{wrapper:#?}"
    );
}

#[tokio::test]
async fn helm_lint_passes_also_strict() {
    let chart = chart();
    for extra in [
        &[][..],
        &["--strict"],
        &["--strict", "--set", "watchNamespaces={training,research}"],
        &["--strict", "--set", "clusterWide=true"],
        &["--strict", "-f", "ALL"],
    ] {
        let all = all_values();
        let mut args = vec!["lint", chart.as_str()];
        args.extend(
            extra
                .iter()
                .map(|a| if *a == "ALL" { all.as_str() } else { a }),
        );
        let out = helm(&args)
            .await
            .expect_ok(&format!("helm {}", args.join(" ")));
        assert!(out.contains("0 chart(s) failed"), "{out}");
        assert!(
            !out.contains("[WARNING]") && !out.contains("[ERROR]"),
            "{out}"
        );
    }
}

/// Every key of values.yaml is in values.schema.json with a type, and the other way round.
#[test]
fn the_schema_covers_every_value() {
    let values: Value = serde_yaml_ng::from_str(&read("charts/ckpt-operator/values.yaml")).unwrap();
    let schema: Value =
        serde_json::from_str(&read("charts/ckpt-operator/values.schema.json")).unwrap();
    assert_eq!(
        schema["$schema"], "http://json-schema.org/draft-07/schema#",
        "draft-07"
    );
    fn walk(path: &str, values: &Value, schema: &Value, missing: &mut Vec<String>) {
        let Some(map) = values.as_object() else {
            return;
        };
        // Free-form objects (resources, affinity, ...) have no listed properties.
        let Some(props) = schema["properties"].as_object() else {
            return;
        };
        assert_eq!(
            schema["additionalProperties"],
            Value::Bool(false),
            "{path}: unknown keys must be refused"
        );
        for (k, v) in map {
            let p = format!("{path}.{k}");
            match props.get(k) {
                None => missing.push(format!("{p} is not in the schema")),
                Some(s) => {
                    if s.get("type").is_none() {
                        missing.push(format!("{p} has no type in the schema"));
                    }
                    walk(&p, v, s, missing);
                }
            }
        }
        for (k, s) in props {
            // A deprecated key is read when given, never set by default.
            let deprecated = s.get("deprecated") == Some(&Value::Bool(true));
            if !map.contains_key(k) && !deprecated && (!path.is_empty() || k != "global") {
                missing.push(format!(
                    "{path}.{k} is in the schema but not in values.yaml"
                ));
            }
        }
    }
    let mut problems = Vec::new();
    walk("", &values, &schema, &mut problems);
    assert!(problems.is_empty(), "{problems:#?}");
}

#[tokio::test]
async fn the_schema_refuses_wrong_types_and_unknown_keys() {
    let chart = chart();
    for (set, needle) in [
        ("replicaCount=two", "replicaCount"),
        ("image.tga=v1", "tga"),
        ("logJson=yes", "logJson"),
        ("converter.backoffLimit=-1", "backoffLimit"),
        ("converter.image.pullPolicy=Sometimes", "pullPolicy"),
        ("metrics.port=0", "port"),
        ("watchNamespaces={Not_A_Namespace}", "watchNamespaces"),
        ("clusterWide=sometimes", "clusterWide"),
        (
            "leaderElection.leaseDurationSeconds=1",
            "leaseDurationSeconds",
        ),
    ] {
        for cmd in ["lint", "template"] {
            let r = helm(&[cmd, &chart, "--set", set]).await;
            let text = format!("{}{}", r.stdout, r.stderr);
            assert!(!r.ok, "helm {cmd} --set {set} should fail:\n{text}");
            assert!(text.contains("schema"), "helm {cmd} --set {set}:\n{text}");
            assert!(text.contains(needle), "helm {cmd} --set {set}:\n{text}");
        }
    }
    let r = helm(&[
        "template",
        &chart,
        "--set-json",
        r#"converter.serviceAccount.namespaces="training""#,
    ])
    .await;
    r.expect_err("a string for converter.serviceAccount.namespaces");
    // Cluster-wide and a namespace list contradict each other.
    let err = helm(&[
        "template",
        &chart,
        "--set",
        "clusterWide=true",
        "--set",
        "watchNamespaces={training}",
    ])
    .await
    .expect_err("clusterWide with watchNamespaces");
    assert!(err.contains("leave watchNamespaces empty"), "{err}");
}

#[tokio::test]
/// Regression (issue 10): by default the operator may act in its own namespace only.
async fn default_values_render_an_operator_for_its_own_namespace() {
    let docs = render("ckpt-system", &[]).await;
    assert_eq!(
        kinds(&docs),
        [
            "CustomResourceDefinition -/checkpointconversions.ckpt.dev",
            "Deployment ckpt-system/ckpt-operator",
            "Role ckpt-system/ckpt-operator",
            "Role ckpt-system/ckpt-operator-leader-election",
            "RoleBinding ckpt-system/ckpt-operator",
            "RoleBinding ckpt-system/ckpt-operator-leader-election",
            "Service ckpt-system/ckpt-operator-metrics",
            "ServiceAccount ckpt-system/ckpt-operator",
            "ServiceAccount ckpt-system/ckpt-operator-converter",
        ]
    );

    // The CRD: crds/ plus labels and the keep annotation.
    let mut crd = find(&docs, "CustomResourceDefinition", CRD_NAME).clone();
    let meta = crd["metadata"].as_object_mut().unwrap();
    assert_eq!(
        meta.remove("annotations").unwrap(),
        json!({"helm.sh/resource-policy": "keep"})
    );
    let labels = meta.remove("labels").unwrap();
    assert_eq!(labels["app.kubernetes.io/managed-by"], "Helm");
    let checked_in: Value = serde_yaml_ng::from_str(&read(CRD_FILE)).unwrap();
    assert!(
        crd == checked_in,
        "the rendered CRD differs from {CRD_FILE}"
    );

    // RBAC: exactly the operator's calls, in its namespace; the Lease there too.
    assert_eq!(
        rules_of(find_in(&docs, "Role", "ckpt-system", RELEASE)),
        operator_permissions()
    );
    assert_eq!(
        rules_of(find(&docs, "Role", "ckpt-operator-leader-election")),
        lease_permissions()
    );
    let binding = find_in(&docs, "RoleBinding", "ckpt-system", RELEASE);
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": RELEASE, "namespace": "ckpt-system"}])
    );
    assert_eq!(
        find(&docs, "ServiceAccount", "ckpt-operator-converter")["automountServiceAccountToken"],
        false
    );

    // The Deployment: the operator's flags, identity from the downward API, locked down.
    assert_eq!(
        args_of(&docs),
        [
            "--converter-image=ghcr.io/ckpt-dev/ckpt-convert:0.1.0",
            "--converter-command=/ckpt-convert",
            "--namespace=ckpt-system",
            "--job-backoff-limit=2",
            "--job-service-account=ckpt-operator-converter",
            "--job-run-as-user=65532",
            "--jobs-per-second=2",
            "--reconcile-concurrency=4",
            "--metrics-addr=0.0.0.0:8080",
            "--leader-elect",
            "--lease-name=ckpt-operator",
            "--lease-duration-seconds=30",
            "--lease-renew-grace-seconds=20",
            "--log-json",
        ]
    );
    let deployment = find(&docs, "Deployment", RELEASE);
    assert_eq!(deployment["spec"]["replicas"], 1);
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], RELEASE);
    assert_eq!(
        pod["securityContext"],
        json!({"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532,
               "seccompProfile": {"type": "RuntimeDefault"}})
    );
    let c = operator_container(&docs);
    assert_eq!(c["image"], "ghcr.io/ckpt-dev/ckpt-operator:0.1.0");
    assert_eq!(
        c["securityContext"],
        json!({"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
               "capabilities": {"drop": ["ALL"]}})
    );
    assert_eq!(
        c["env"],
        json!([
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "LOG_LEVEL", "value": "info"},
        ])
    );
    assert_eq!(
        c["ports"],
        json!([{"name": "metrics", "containerPort": 8080, "protocol": "TCP"}])
    );
    assert_eq!(
        c["livenessProbe"]["httpGet"],
        json!({"path": "/healthz", "port": "metrics"})
    );
    assert_eq!(
        c["readinessProbe"]["httpGet"],
        json!({"path": "/readyz", "port": "metrics"})
    );
    let svc = find(&docs, "Service", "ckpt-operator-metrics");
    assert_eq!(
        svc["spec"]["ports"],
        json!([{"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}])
    );
    assert_eq!(
        svc["spec"]["selector"],
        deployment["spec"]["selector"]["matchLabels"]
    );
}

#[tokio::test]
async fn watch_namespaces_render_a_role_in_each_and_nothing_cluster_wide() {
    let docs = render("ckpt-system", &["watchNamespaces={training,research}"]).await;
    assert!(
        !docs
            .iter()
            .any(|d| d["kind"] == "ClusterRole" || d["kind"] == "ClusterRoleBinding"),
        "{:#?}",
        kinds(&docs)
    );
    for ns in ["training", "research"] {
        assert_eq!(
            rules_of(find_in(&docs, "Role", ns, RELEASE)),
            operator_permissions()
        );
        let binding = find_in(&docs, "RoleBinding", ns, RELEASE);
        assert_eq!(
            binding["subjects"],
            json!([{"kind": "ServiceAccount", "name": RELEASE, "namespace": "ckpt-system"}])
        );
        // Converter pods run in the watched namespaces, so their account lives there.
        find_in(&docs, "ServiceAccount", ns, "ckpt-operator-converter");
    }
    // Not in the release namespace, which is not watched.
    assert!(
        !docs.iter().any(|d| d["kind"] == "Role"
            && d["metadata"]["name"] == RELEASE
            && d["metadata"]["namespace"] == "ckpt-system"),
        "{:#?}",
        kinds(&docs)
    );
    // The Lease stays in the operator's namespace.
    let lease = find(&docs, "Role", "ckpt-operator-leader-election");
    assert_eq!(lease["metadata"]["namespace"], "ckpt-system");
    let args = args_of(&docs);
    assert!(
        args.contains(&"--namespace=training".to_owned())
            && args.contains(&"--namespace=research".to_owned()),
        "{args:?}"
    );
}

/// Chart 0.1's single `watchNamespace` still works, read as `watchNamespaces: [it]`,
/// and the install notes say it is deprecated; an empty one no longer means every
/// namespace; set together with `watchNamespaces`, the chart refuses.
#[tokio::test]
async fn the_deprecated_watch_namespace_is_read_as_watch_namespaces() {
    assert_eq!(
        render("ckpt-system", &["watchNamespace=deprecated-watch"]).await,
        render("ckpt-system", &["watchNamespaces={deprecated-watch}"]).await
    );
    assert_eq!(
        render("ckpt-system", &["watchNamespace="]).await,
        render("ckpt-system", &[]).await
    );
    let chart = chart();
    // A namespace no other test creates objects in: helm's dry run checks that the
    // objects it would create (the converter's ServiceAccount there) are not
    // another release's, and the `helm install` test's release owns `training`'s.
    let notes = |value: &'static str| {
        let chart = chart.clone();
        async move {
            // helm install reads the cluster's version even for a client dry run.
            crate::support::helm(&[
                "install",
                RELEASE,
                &chart,
                "-n",
                "ckpt-system",
                "--dry-run=client",
                // The shared cluster's CRD belongs to another release.
                "--set",
                "crds.install=false",
                "--set",
                value,
            ])
            .await
            .expect_ok("helm install --dry-run")
        }
    };
    let out = notes("watchNamespace=deprecated-watch").await;
    assert!(
        out.contains("DEPRECATED: watchNamespace")
            && out.contains("It is read as watchNamespaces: [deprecated-watch].")
            && out.contains("It watches namespace deprecated-watch"),
        "{out}"
    );
    let out = notes("watchNamespace=").await;
    assert!(
        out.contains("An empty watchNamespace used to mean every namespace")
            && out.contains("It watches namespace ckpt-system"),
        "{out}"
    );
    assert!(
        !notes("watchNamespaces={deprecated-watch}")
            .await
            .contains("DEPRECATED")
    );
    let err = helm(&[
        "template",
        RELEASE,
        &chart,
        "--set",
        "watchNamespace=deprecated-watch",
        "--set",
        "watchNamespaces={research}",
    ])
    .await
    .expect_err("both keys");
    assert!(err.contains("are both set"), "{err}");
}

#[tokio::test]
async fn cluster_wide_is_an_opt_in_with_a_cluster_role() {
    let docs = render("ckpt-system", &["clusterWide=true"]).await;
    assert_eq!(
        rules_of(find(&docs, "ClusterRole", RELEASE)),
        operator_permissions()
    );
    let binding = find(&docs, "ClusterRoleBinding", RELEASE);
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": RELEASE, "namespace": "ckpt-system"}])
    );
    assert!(
        !docs
            .iter()
            .any(|d| d["kind"] == "Role" && d["metadata"]["name"] == RELEASE),
        "{:#?}",
        kinds(&docs)
    );
    assert!(
        !args_of(&docs).iter().any(|a| a.starts_with("--namespace")),
        "{:?}",
        args_of(&docs)
    );
}

#[tokio::test]
async fn values_switch_what_they_say() {
    // No leader election: no Lease Role, no flag.
    let docs = render("ckpt-system", &["leaderElection.enabled=false"]).await;
    assert!(
        !docs.iter().any(
            |d| d["kind"] == "Role" && d["metadata"]["name"] == "ckpt-operator-leader-election"
        ),
        "{:#?}",
        kinds(&docs)
    );
    assert!(
        !args_of(&docs)
            .iter()
            .any(|a| a.starts_with("--lease") || a == "--leader-elect")
    );
    // Two replicas without a Lease would both reconcile: refused.
    let chart = chart();
    let err = helm(&[
        "template",
        RELEASE,
        &chart,
        "--set",
        "replicaCount=2",
        "--set",
        "leaderElection.enabled=false",
    ])
    .await
    .expect_err("replicaCount=2 without leader election");
    assert!(err.contains("leaderElection.enabled"), "{err}");

    // Lease timing.
    let docs = render(
        "ckpt-system",
        &[
            "leaderElection.leaseDurationSeconds=60",
            "leaderElection.renewGraceSeconds=20",
        ],
    )
    .await;
    let args = args_of(&docs);
    for want in [
        "--lease-duration-seconds=60",
        "--lease-renew-grace-seconds=20",
    ] {
        assert!(args.contains(&want.to_owned()), "{want} not in {args:?}");
    }

    // CRD switches.
    let docs = render("ckpt-system", &["crds.install=false"]).await;
    assert!(!docs.iter().any(|d| d["kind"] == "CustomResourceDefinition"));
    let docs = render("ckpt-system", &["crds.keep=false"]).await;
    assert!(
        find(&docs, "CustomResourceDefinition", CRD_NAME)["metadata"]
            .get("annotations")
            .is_none()
    );

    // RBAC and accounts off.
    let docs = render(
        "ckpt-system",
        &[
            "rbac.create=false",
            "serviceAccount.create=false",
            "serviceAccount.name=existing",
            "converter.serviceAccount.create=false",
        ],
    )
    .await;
    assert!(
        !docs.iter().any(|d| d["kind"]
            .as_str()
            .is_some_and(|k| k.contains("Role") || k == "ServiceAccount")),
        "{:#?}",
        kinds(&docs)
    );
    assert_eq!(
        find(&docs, "Deployment", RELEASE)["spec"]["template"]["spec"]["serviceAccountName"],
        "existing"
    );
    assert!(
        !args_of(&docs)
            .iter()
            .any(|a| a.starts_with("--job-service-account"))
    );

    // Optional flags, images, logging, extras, ServiceMonitor.
    let docs = render(
        "ckpt-system",
        &[
            "converter.ttlSecondsAfterFinished=0",
            "converter.image.pullPolicy=Always",
            "converter.image.tag=v9",
            "image.tag=v8",
            "logJson=false",
            "logLevel=debug",
            "extraArgs={--instance=operator-a}",
            "converter.command=/bin/ckpt-convert",
            "converter.serviceAccount.namespaces={training,research}",
            "metrics.serviceMonitor.enabled=true",
            "metrics.port=9090",
        ],
    )
    .await;
    let args = args_of(&docs);
    for want in [
        "--job-ttl-seconds=0",
        "--converter-image-pull-policy=Always",
        "--converter-image=ghcr.io/ckpt-dev/ckpt-convert:v9",
        "--metrics-addr=0.0.0.0:9090",
        "--converter-command=/bin/ckpt-convert",
        "--instance=operator-a",
    ] {
        assert!(args.contains(&want.to_owned()), "{want} not in {args:?}");
    }
    assert!(!args.contains(&"--log-json".to_owned()), "{args:?}");
    assert_eq!(
        operator_container(&docs)["image"],
        "ghcr.io/ckpt-dev/ckpt-operator:v8"
    );
    assert_eq!(operator_container(&docs)["env"][2]["value"], "debug");
    let converter_namespaces: BTreeSet<&str> = docs
        .iter()
        .filter(|d| {
            d["kind"] == "ServiceAccount" && d["metadata"]["name"] == "ckpt-operator-converter"
        })
        .map(|d| d["metadata"]["namespace"].as_str().unwrap())
        .collect();
    assert_eq!(
        converter_namespaces,
        BTreeSet::from(["training", "research"])
    );
    let monitor = find(&docs, "ServiceMonitor", RELEASE);
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "metrics");
    assert_eq!(
        monitor["spec"]["selector"]["matchLabels"],
        find(&docs, "Deployment", RELEASE)["spec"]["selector"]["matchLabels"]
    );
}

/// ci/all-values.yaml: every optional value lands where it should.
#[tokio::test]
async fn every_optional_value_is_rendered() {
    let all = all_values();
    let docs = render_with("ckpt-system", &["-f", &all]).await;
    let values: Value = serde_yaml_ng::from_str(&std::fs::read_to_string(&all).unwrap()).unwrap();
    let d = deployment(&docs);
    assert_eq!(d["spec"]["replicas"], values["replicaCount"]);
    let meta = &d["spec"]["template"]["metadata"];
    assert_eq!(meta["annotations"], values["podAnnotations"]);
    assert_eq!(
        meta["labels"]["example.com/team"],
        values["podLabels"]["example.com/team"]
    );
    let pod = &d["spec"]["template"]["spec"];
    for key in [
        "imagePullSecrets",
        "priorityClassName",
        "nodeSelector",
        "tolerations",
        "affinity",
    ] {
        assert_eq!(pod[key], values[key], "{key}");
    }
    assert_eq!(pod["serviceAccountName"], "operator");
    let c = operator_container(&docs);
    assert_eq!(c["resources"], values["resources"]);
    assert_eq!(c["imagePullPolicy"], "Always");
    assert_eq!(
        c["image"],
        "registry.example.com/ckpt/ckpt-operator:v0.1.0-test"
    );
    assert_eq!(c["env"][3], values["extraEnv"][0]);
    assert_eq!(c["ports"][0]["containerPort"], 9090);
    let args = args_of(&docs);
    for want in [
        "--converter-image=registry.example.com/ckpt/ckpt-convert:v0.1.0-test",
        "--converter-image-pull-policy=IfNotPresent",
        "--job-backoff-limit=4",
        "--job-ttl-seconds=3600",
        "--job-service-account=converter",
        "--job-run-as-user=1000",
        "--jobs-per-second=0.5",
        "--reconcile-concurrency=8",
        "--lease-name=ckpt-operator-test",
        "--instance=ckpt-operator-test",
    ] {
        assert!(args.contains(&want.to_owned()), "{want} not in {args:?}");
    }
    let sa = find(&docs, "ServiceAccount", "operator");
    assert_eq!(
        sa["metadata"]["annotations"],
        values["serviceAccount"]["annotations"]
    );
    let converter = find(&docs, "ServiceAccount", "converter");
    assert_eq!(
        converter["metadata"]["annotations"],
        values["converter"]["serviceAccount"]["annotations"]
    );
    let svc = find(&docs, "Service", "ckpt-operator-metrics");
    assert_eq!(
        svc["metadata"]["annotations"],
        values["metrics"]["service"]["annotations"]
    );
    assert_eq!(svc["spec"]["ports"][0]["port"], 9090);
}

/// The flags the chart renders are ones the operator binary accepts, with values it parses.
#[tokio::test]
async fn the_operator_binary_accepts_the_rendered_flags() {
    let all = all_values();
    let mut renders = vec![render_with("ckpt-system", &["-f", &all]).await];
    for sets in [
        &[][..],
        &[
            "watchNamespaces={training,research}",
            "converter.ttlSecondsAfterFinished=600",
        ],
        &["clusterWide=true"],
        &[
            "logJson=false",
            "leaderElection.enabled=false",
            "converter.image.pullPolicy=Never",
        ],
    ] {
        renders.push(render("ckpt-system", sets).await);
    }
    for docs in renders {
        let mut args = args_of(&docs);
        // clap parses (and checks) every argument before it acts on --help.
        args.push("--help".into());
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_ckpt-operator"))
            .args(&args)
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "ckpt-operator refused {args:?}:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

// ---------------------------------------------------------------------------------------
// Against the control plane

#[tokio::test]
async fn the_rendered_chart_passes_a_server_side_dry_run() {
    let cp = cp().await;
    let ns = cp.new_namespace("chart-dry-run").await.unwrap();
    let other = cp.new_namespace("chart-dry-run-watched").await.unwrap();
    let chart = chart();
    let all = all_values();
    let watch = format!("watchNamespaces={{{ns},{other}}}");
    for extra in [
        &[][..],
        &["--set", &watch],
        &["--set", "clusterWide=true"],
        &["-f", &all],
    ] {
        let mut args = vec!["template", RELEASE, chart.as_str(), "--namespace", &ns];
        args.extend_from_slice(extra);
        let yaml = helm(&args).await.expect_ok("helm template");
        let out = kubectl(&["apply", "--dry-run=server", "-f", "-"], &yaml)
            .await
            .expect_ok(&format!(
                "kubectl apply --dry-run=server of helm {}",
                args.join(" ")
            ));
        // One "… (server dry run)" line per rendered object.
        let objects = parse_docs(&yaml).len();
        assert!(objects >= 8, "{yaml}");
        assert_eq!(
            out.lines()
                .filter(|l| l.ends_with("(server dry run)"))
                .count(),
            objects,
            "{out}"
        );
        assert!(out.contains("deployment.apps/ckpt-operator"), "{out}");
    }
}

async fn access(client: &Client, user: &str, ns: Option<&str>, attrs: (&str, &str, &str)) -> bool {
    let (group, resource, verb) = attrs;
    let (resource, subresource) = match resource.split_once('/') {
        Some((r, s)) => (r, Some(s.to_owned())),
        None => (resource, None),
    };
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.to_owned()),
            groups: Some(vec![
                "system:serviceaccounts".into(),
                "system:authenticated".into(),
            ]),
            resource_attributes: Some(ResourceAttributes {
                group: Some(group.to_owned()),
                resource: Some(resource.to_owned()),
                subresource,
                verb: Some(verb.to_owned()),
                namespace: ns.map(str::to_owned),
                ..ResourceAttributes::default()
            }),
            ..SubjectAccessReviewSpec::default()
        },
        ..SubjectAccessReview::default()
    };
    Api::<SubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .expect("SubjectAccessReview")
        .status
        .is_some_and(|s| s.allowed)
}

/// Creates (or keeps) namespace `name`.
async fn namespace(name: &str) {
    let r = kubectl(&["create", "namespace", name], "").await;
    assert!(
        r.ok || r.stderr.contains("AlreadyExists"),
        "creating namespace {name}: {}",
        r.stderr
    );
}

/// A real `helm install` and what it creates; the examples against its CRD; the operator
/// binary run as the chart deploys it; a cluster-wide release for who opts in; upgrade;
/// uninstall keeps the CRD. The CRD is one per cluster: it came with the first release
/// ([`crd_installed`], the chart's defaults), which this test checks and finally
/// uninstalls.
#[tokio::test]
async fn helm_install_creates_a_working_operator_setup() {
    let cp = cp().await;
    let client = cp.client();
    crd_installed().await;
    check_crd(&client).await;
    let ns = cp.new_namespace("chart-install").await.unwrap();
    // The examples' namespace; only this test uses it.
    namespace("training").await;
    let chart = chart();

    // Wrong values are refused by install too, before anything is created.
    let err = crate::support::helm(&[
        "install",
        "bad",
        &chart,
        "-n",
        &ns,
        "--set",
        "replicaCount=two",
    ])
    .await
    .expect_err("helm install with replicaCount=two");
    assert!(err.contains("replicaCount"), "{err}");

    let sets = ["watchNamespaces={training}", "crds.install=false"];
    let mut args = vec!["install", RELEASE, chart.as_str(), "-n", ns.as_str()];
    for s in &sets {
        args.extend(["--set", s]);
    }
    let notes = crate::support::helm(&args).await.expect_ok("helm install");
    for want in [
        "kubectl apply -f examples/megatron-to-hf.yaml",
        "It watches namespace training (leader election on, 1 replica(s)).",
        "Conversions in any other namespace are not seen.",
        "--set 'watchNamespaces={training,NEW-NAMESPACE}'",
        "created in: training.",
    ] {
        assert!(notes.contains(want), "{want:?} not in the NOTES:\n{notes}");
    }
    check_installed_objects(&client, &ns).await;
    check_examples().await;
    let docs = render(&ns, &sets).await;
    run_operator_as_deployed(&client, &ns, &docs).await;
    check_cluster_wide_release(&client, &ns).await;

    // Upgrade re-applies what the values say; uninstall takes the Roles along.
    crate::support::helm(&[
        "upgrade",
        RELEASE,
        &chart,
        "-n",
        &ns,
        "--reuse-values",
        "--set",
        "replicaCount=2",
    ])
    .await
    .expect_ok("helm upgrade");
    crate::support::helm(&["uninstall", RELEASE, "-n", &ns])
        .await
        .expect_ok("helm uninstall");
    assert!(
        Api::<Role>::namespaced(client.clone(), "training")
            .get_opt(RELEASE)
            .await
            .unwrap()
            .is_none(),
        "the Role goes with the release"
    );
    // The first release's CRD survives its uninstall (crds.keep).
    crate::support::helm(&["uninstall", CRD_RELEASE, "-n", CRD_NAMESPACE])
        .await
        .expect_ok("helm uninstall of the CRD release");
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    assert!(
        crds.get_opt(CRD_NAME).await.unwrap().is_some(),
        "crds.keep: the CRD survives helm uninstall"
    );
}

/// The CRD a real `helm install` created: established, Helm's, kept on uninstall.
async fn check_crd(client: &Client) {
    let crd = Api::<CustomResourceDefinition>::all(client.clone())
        .get(CRD_NAME)
        .await
        .unwrap();
    let established = crd
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
        });
    assert!(established, "{:#?}", crd.status);
    assert_eq!(
        crd.metadata
            .annotations
            .clone()
            .unwrap_or_default()
            .get("helm.sh/resource-policy")
            .map(String::as_str),
        Some("keep")
    );
    assert_eq!(
        crd.metadata
            .labels
            .unwrap_or_default()
            .get("app.kubernetes.io/managed-by")
            .map(String::as_str),
        Some("Helm")
    );
}

async fn check_installed_objects(client: &Client, ns: &str) {
    // RBAC: exactly the operator's calls, in the watched namespace only.
    let role = Api::<Role>::namespaced(client.clone(), "training")
        .get(RELEASE)
        .await
        .unwrap();
    assert_eq!(
        triples(role.rules.as_deref().unwrap_or_default()),
        operator_permissions(),
        "Role training/{RELEASE}"
    );
    assert!(
        Api::<ClusterRole>::all(client.clone())
            .get_opt(RELEASE)
            .await
            .unwrap()
            .is_none(),
        "no ClusterRole unless clusterWide"
    );
    let lease_role = Api::<Role>::namespaced(client.clone(), ns)
        .get("ckpt-operator-leader-election")
        .await
        .unwrap();
    assert_eq!(
        triples(lease_role.rules.as_deref().unwrap_or_default()),
        lease_permissions()
    );
    let binding = Api::<RoleBinding>::namespaced(client.clone(), "training")
        .get(RELEASE)
        .await
        .unwrap();
    let subject = &binding.subjects.as_deref().unwrap()[0];
    assert_eq!(
        (
            subject.kind.as_str(),
            subject.name.as_str(),
            subject.namespace.as_deref()
        ),
        ("ServiceAccount", RELEASE, Some(ns))
    );

    // The accounts: the operator's in its namespace, the converter's where it runs.
    Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .get(RELEASE)
        .await
        .expect("the operator ServiceAccount");
    let converter = Api::<ServiceAccount>::namespaced(client.clone(), "training")
        .get("ckpt-operator-converter")
        .await
        .expect("converter ServiceAccount in training");
    assert_eq!(converter.automount_service_account_token, Some(false));

    // What the apiserver's authorizer lets the operator do, and where not.
    let user = format!("system:serviceaccount:{ns}:{RELEASE}");
    for (group, resource, verb) in operator_permissions() {
        assert!(
            access(client, &user, Some("training"), (&group, &resource, &verb)).await,
            "{user} may not {verb} {resource}.{group} in training"
        );
        assert!(
            !access(client, &user, Some("default"), (&group, &resource, &verb)).await,
            "{user} may {verb} {resource}.{group} in a namespace it does not watch"
        );
    }
    assert!(
        !access(client, &user, None, ("batch", "jobs", "create")).await,
        "the operator may create Jobs in every namespace"
    );
    for (_, _, verb) in lease_permissions() {
        assert!(
            access(
                client,
                &user,
                Some(ns),
                ("coordination.k8s.io", "leases", &verb)
            )
            .await
        );
    }
    for denied in [
        ("", "secrets", "get"),
        ("", "pods", "get"),
        ("", "pods", "create"),
        ("", "events", "create"),
        ("batch", "jobs", "patch"),
        ("batch", "jobs", "update"),
        ("ckpt.dev", "checkpointconversions", "update"),
        ("ckpt.dev", "checkpointconversions", "delete"),
        ("ckpt.dev", "checkpointconversions/status", "update"),
        ("", "persistentvolumeclaims", "list"),
        ("coordination.k8s.io", "leases", "patch"),
    ] {
        assert!(
            !access(client, &user, Some("training"), denied).await,
            "{user} may {denied:?} in training"
        );
    }
}

/// Four examples are accepted by the installed CRD, one is refused by its CEL rule.
async fn check_examples() {
    for example in [
        "hf-to-megatron.yaml",
        "megatron-to-hf.yaml",
        "merge-lora-hf-peft.yaml",
        "merge-lora-megatron-bridge.yaml",
    ] {
        let path = root().join("examples").join(example).display().to_string();
        kubectl(&["apply", "--dry-run=server", "-f", &path], "")
            .await
            .expect_ok(&format!(
                "kubectl apply --dry-run=server -f examples/{example}"
            ));
    }
    let path = root()
        .join("examples/illegal-target-inside-source.yaml")
        .display()
        .to_string();
    let err = kubectl(&["apply", "--dry-run=server", "-f", &path], "")
        .await
        .expect_err("examples/illegal-target-inside-source.yaml");
    assert!(
        err.contains(
            "target.path must not equal, be inside, or contain source.path on the same PVC"
        ),
        "{err}"
    );
}

/// The operator binary with the arguments and environment the chart's Deployment gives
/// it, authenticated with a token of the chart's ServiceAccount: it takes the Lease and
/// turns examples/megatron-to-hf.yaml into a Job, and the apiserver denies it nothing.
async fn run_operator_as_deployed(client: &Client, ns: &str, docs: &[Value]) {
    let cp = cp().await;
    let args: Vec<String> = args_of(docs)
        .into_iter()
        .map(|a| {
            if a.starts_with("--metrics-addr=") {
                "--metrics-addr=127.0.0.1:0".to_owned()
            } else {
                a
            }
        })
        .collect();
    let pod = &deployment(docs)["spec"]["template"]["spec"];
    let account = pod["serviceAccountName"].as_str().unwrap();
    let kubeconfig = cp
        .kubeconfig_for_service_account(ns, account)
        .await
        .unwrap();
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_ckpt-operator"));
    cmd.args(&args).env("KUBECONFIG", &kubeconfig);
    for e in operator_container(docs)["env"].as_array().unwrap() {
        let name = e["name"].as_str().unwrap();
        let value = match (name, e["value"].as_str()) {
            (_, Some(v)) => v.to_owned(),
            ("POD_NAME", None) => "ckpt-operator-test-0".to_owned(),
            ("POD_NAMESPACE", None) => ns.to_owned(),
            _ => panic!("unexpected env {e}"),
        };
        cmd.env(name, value);
    }
    let log = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("operator-{ns}.log"));
    let file = std::fs::File::create(&log).unwrap();
    let mut operator = cmd
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();

    // It holds the Lease the chart named, under its pod name.
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), ns);
    let waiting = Waiting::new("the operator to hold its Lease");
    loop {
        let holder = leases
            .get_opt(RELEASE)
            .await
            .unwrap()
            .and_then(|l| l.spec)
            .and_then(|s| s.holder_identity);
        if holder.as_deref() == Some("ckpt-operator-test-0") {
            break;
        }
        if let Ok(Some(status)) = operator.try_wait() {
            panic!("the operator exited ({status}):\n{}", log_text());
        }
        waiting
            .tick(|| format!("holder {holder:?}; log:\n{}", log_text()))
            .await;
    }

    // The claims exist; then the conversion: a Job, status Running, events. On the
    // real node the claims are bound and hold the example's source and base model, so
    // the kubelet runs the conversion to its validated end.
    let real = node_kind() == NodeKind::Real;
    let claims = tempfile::tempdir().unwrap();
    if real {
        fixtures_in(claims.path());
        std::fs::create_dir_all(claims.path().join("lustre-shared/output/convert")).unwrap();
        let node = RealNode::shared().await.unwrap_or_else(|e| panic!("{e}"));
        for name in ["lustre-shared", "models"] {
            let dir = claims.path().join(name);
            chown_tree(&dir, IMAGE_USER).unwrap();
            node.bind_claim(client, "training", name, &dir)
                .await
                .unwrap_or_else(|e| panic!("binding claim {name}: {e}"));
        }
    } else {
        let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "training");
        for name in ["lustre-shared", "models"] {
            let pvc: PersistentVolumeClaim = serde_json::from_value(json!({
                "metadata": {"name": name},
                "spec": {"accessModes": ["ReadWriteMany"],
                         "resources": {"requests": {"storage": "1Gi"}}}
            }))
            .unwrap();
            pvcs.create(&PostParams::default(), &pvc).await.unwrap();
        }
    }
    let example = root()
        .join("examples/megatron-to-hf.yaml")
        .display()
        .to_string();
    kubectl(&["apply", "-f", &example], "")
        .await
        .expect_ok("kubectl apply -f examples/megatron-to-hf.yaml");
    let jobs: Api<Job> = Api::namespaced(client.clone(), "training");
    let crs: Api<ckpt_operator::api::CheckpointConversion> =
        Api::namespaced(client.clone(), "training");
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(client.clone(), "training");
    // The stand-in serves no pod of this namespace: the Job stays Running there.
    let want = if real { "Succeeded" } else { "Running" };
    let waiting = Waiting::new(format!("a Job, {want} status and an event for sft-to-hf"));
    let job = loop {
        let job = jobs.get_opt("sft-to-hf-g1").await.unwrap();
        let cr = crs.get("sft-to-hf").await.ok();
        let phase = cr.as_ref().and_then(|c| c.status.as_ref()?.phase.clone());
        if phase.as_deref() == Some("Failed") {
            panic!("sft-to-hf failed: {:#?}", cr.and_then(|c| c.status));
        }
        let published = events
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .iter()
            .any(|e| e.reporting_controller.as_deref() == Some("ckpt-operator"));
        if let Some(job) = job
            && phase.as_deref() == Some(want)
            && published
        {
            if real {
                assert!(
                    cr.as_ref().is_some_and(validated),
                    "Succeeded but not Validated: {:#?}",
                    cr.and_then(|c| c.status)
                );
                let config = claims
                    .path()
                    .join("lustre-shared/output/convert/sft-hf/config.json");
                assert!(config.is_file(), "{} was not published", config.display());
            }
            break job;
        }
        if let Ok(Some(status)) = operator.try_wait() {
            panic!("the operator exited ({status}):\n{}", log_text());
        }
        waiting
            .tick(|| format!("phase {phase:?}, event {published}:\n{}", log_text()))
            .await;
    };
    let pod_spec = job.spec.unwrap().template.spec.unwrap();
    assert_eq!(
        pod_spec.service_account_name.as_deref(),
        Some("ckpt-operator-converter"),
        "converter pods run as the chart's converter account"
    );
    assert_eq!(
        pod_spec.containers[0].image.as_deref(),
        Some("ghcr.io/ckpt-dev/ckpt-convert:0.1.0")
    );
    assert_eq!(
        job.metadata
            .annotations
            .unwrap_or_default()
            .get("ckpt.dev/created-by")
            .map(String::as_str),
        Some("ckpt-operator-test-0")
    );

    let _ = operator.start_kill();
    let _ = operator.wait().await;
    let denied = cp
        .denied_requests(&format!("system:serviceaccount:{ns}:{account}"))
        .unwrap();
    assert!(
        denied.is_empty(),
        "the apiserver denied the operator under the chart's RBAC:\n{}",
        denied.join("\n")
    );
    kubectl(&["delete", "-f", &example, "--wait=false"], "")
        .await
        .expect_ok("kubectl delete -f examples/megatron-to-hf.yaml");
}

/// A second release that opts in to all namespaces: a ClusterRole, with the CRD left to
/// the first.
async fn check_cluster_wide_release(client: &Client, other_ns: &str) {
    let cp = cp().await;
    let ns = cp.new_namespace("chart-install-wide").await.unwrap();
    let chart = chart();
    crate::support::helm(&[
        "install",
        "ckpt-wide",
        &chart,
        "-n",
        &ns,
        "--set",
        "clusterWide=true",
        "--set",
        "crds.install=false",
    ])
    .await
    .expect_ok("helm install with clusterWide");
    let role = Api::<ClusterRole>::all(client.clone())
        .get("ckpt-wide-ckpt-operator")
        .await
        .unwrap();
    assert_eq!(
        triples(role.rules.as_deref().unwrap_or_default()),
        operator_permissions()
    );
    let user = format!("system:serviceaccount:{ns}:ckpt-wide-ckpt-operator");
    assert!(
        access(client, &user, Some(other_ns), ("batch", "jobs", "create")).await,
        "the cluster-wide operator may create Jobs anywhere"
    );
    assert!(
        access(
            client,
            &user,
            None,
            ("ckpt.dev", "checkpointconversions", "list")
        )
        .await,
        "the cluster-wide operator may list across namespaces"
    );
    crate::support::helm(&["uninstall", "ckpt-wide", "-n", &ns])
        .await
        .expect_ok("helm uninstall ckpt-wide");
}
