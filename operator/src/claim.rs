//! Target claims: one resource owns a target, and the apiserver, not a cache, says
//! which.
//!
//! Two resources applied in the same second both see no owner in their watch caches,
//! so a check against the cache can be raced. Instead each claim (PVC) of a namespace
//! has one record, a Lease named [`record_name`], whose annotation
//! [`RECORD_ANNOTATION`] maps each claimed target path to its owner (name and uid).
//! A resource takes its targets before its Job is created, by updating that record
//! with its `resourceVersion` as precondition: of two racing writers one gets a
//! conflict, reads again, and sees the other. Paths that contain one another
//! conflict too, which one object per claim (rather than per path) makes checkable
//! in the same write.
//!
//! An owner that no longer exists (by name and uid, read from the apiserver) holds
//! nothing once its pods have stopped: its entries are dropped by the next writer. Every owner is also an owner
//! reference of the record, so the garbage collector deletes a record nobody holds.

use std::collections::BTreeMap;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, ListParams, ObjectMeta, PostParams};
use kube::{Resource, ResourceExt};
use serde::{Deserialize, Serialize};

use crate::api::{CheckpointConversion, CheckpointConversionSpec};
use crate::job::CONVERSION_LABEL;

/// The annotation of a record holding its entries (JSON: path → owner).
pub const RECORD_ANNOTATION: &str = "ckpt.dev/targets";
/// Label of every record, with the claim it is for.
pub const RECORD_LABEL: &str = "ckpt.dev/target-claim";

/// Who holds a target.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    /// The resource's name.
    pub name: String,
    /// Its uid: a resource created again under the same name is another owner.
    pub uid: String,
}

/// Target path → owner, for one claim.
pub type Record = BTreeMap<String, Owner>;

/// The `(claim, path)` targets `spec` writes: the target, and the merged Megatron
/// checkpoint of a Megatron-Bridge LoRA merge.
pub fn targets(spec: &CheckpointConversionSpec) -> Vec<(String, String)> {
    let mut out = vec![(spec.target.pvc.clone(), spec.target.path.clone())];
    if let Some(t) = spec.lora.as_ref().and_then(|l| l.megatron_target.as_ref()) {
        out.push((t.pvc.clone(), t.path.clone()));
    }
    out.sort();
    out.dedup();
    out
}

/// True when two paths in one claim are the same or one contains the other.
pub fn overlaps(a: &str, b: &str) -> bool {
    a == b || a.starts_with(&format!("{b}/")) || b.starts_with(&format!("{a}/"))
}

/// True when two resources write overlapping targets.
pub fn conflicting(a: &CheckpointConversionSpec, b: &CheckpointConversionSpec) -> bool {
    targets(a).iter().any(|(ca, pa)| {
        targets(b)
            .iter()
            .any(|(cb, pb)| ca == cb && overlaps(pa, pb))
    })
}

/// The entries of `record` that stand in the way of `me` claiming `path`.
pub fn blockers<'a>(record: &'a Record, path: &str, me: &Owner) -> Vec<(&'a String, &'a Owner)> {
    record
        .iter()
        .filter(|(p, o)| overlaps(p, path) && *o != me)
        .collect()
}

/// `record` with `dead` owners' entries gone and `path` held by `me`.
pub fn with_claim(record: &Record, path: &str, me: &Owner, dead: &[Owner]) -> Record {
    let mut out: Record = record
        .iter()
        .filter(|(_, o)| !dead.contains(o))
        .map(|(p, o)| (p.clone(), o.clone()))
        .collect();
    out.insert(path.to_owned(), me.clone());
    out
}

/// The record of claim `pvc`: a Lease name (a DNS subdomain of at most 253
/// characters), with a digest instead of the claim name when that would not fit.
pub fn record_name(pvc: &str) -> String {
    let name = format!("ckpt-targets.{pvc}");
    if name.len() <= 253 {
        return name;
    }
    let digest = pvc.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    format!("ckpt-targets.{:016x}", digest)
}

fn parse(lease: &Lease) -> Record {
    lease
        .annotations()
        .get(RECORD_ANNOTATION)
        .and_then(|t| serde_json::from_str(t).ok())
        .unwrap_or_default()
}

fn owner_of(cr: &CheckpointConversion) -> Owner {
    Owner {
        name: cr.name_any(),
        uid: cr.metadata.uid.clone().unwrap_or_default(),
    }
}

/// Who stands in the way of a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// The resource that holds the target.
    pub owner: String,
    /// When that resource is gone: a pod of it that still runs (the garbage collector
    /// removes it, but until it has stopped it may still write the target).
    pub running_pod: Option<String>,
}

/// Whether `owner` still holds its claim, asked of the apiserver (the watch cache
/// may not have seen a resource created a moment ago): it exists, or it is gone but
/// one of its pods still runs.
async fn holder(
    client: &kube::Client,
    ns: &str,
    owner: &Owner,
) -> Result<Option<Conflict>, kube::Error> {
    let crs: Api<CheckpointConversion> = Api::namespaced(client.clone(), ns);
    if crs
        .get_opt(&owner.name)
        .await?
        .is_some_and(|cr| cr.metadata.uid.as_deref() == Some(owner.uid.as_str()))
    {
        return Ok(Some(Conflict {
            owner: owner.name.clone(),
            running_pod: None,
        }));
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let running = pods
        .list(&ListParams::default().labels(&format!("{CONVERSION_LABEL}={}", owner.name)))
        .await?
        .items
        .into_iter()
        .find(|p| {
            !matches!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            )
        });
    Ok(running.map(|p| Conflict {
        owner: owner.name.clone(),
        running_pod: Some(p.name_any()),
    }))
}

/// How many times a write that lost a race is tried again before the reconcile
/// fails (and is retried by the controller).
const ATTEMPTS: usize = 8;

/// Takes every target of `cr`, or none: then who holds the first target held by
/// another resource. Already held targets cost one read.
///
/// # Errors
/// API errors, and a record that kept changing under us for [`ATTEMPTS`] writes.
pub async fn claim(
    client: &kube::Client,
    ns: &str,
    cr: &CheckpointConversion,
) -> Result<Option<Conflict>, kube::Error> {
    let me = owner_of(cr);
    let mut taken: Vec<(String, String)> = Vec::new();
    for (pvc, path) in targets(&cr.spec) {
        if let Some(owner) = claim_one(client, ns, cr, &me, &pvc, &path).await? {
            for (pvc, path) in taken {
                release(client, ns, &me, &pvc, &path).await?;
            }
            return Ok(Some(owner));
        }
        taken.push((pvc, path));
    }
    Ok(None)
}

async fn claim_one(
    client: &kube::Client,
    ns: &str,
    cr: &CheckpointConversion,
    me: &Owner,
    pvc: &str,
    path: &str,
) -> Result<Option<Conflict>, kube::Error> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), ns);
    let name = record_name(pvc);
    let mut last = None;
    for _ in 0..ATTEMPTS {
        let current = leases.get_opt(&name).await?;
        let record = current.as_ref().map(parse).unwrap_or_default();
        if record.get(path) == Some(me) {
            return Ok(None);
        }
        let mut dead = Vec::new();
        for (_, owner) in blockers(&record, path, me) {
            if let Some(conflict) = holder(client, ns, owner).await? {
                return Ok(Some(conflict));
            }
            dead.push(owner.clone());
        }
        let record = with_claim(&record, path, me, &dead);
        let mut lease = current.clone().unwrap_or_else(|| Lease {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(ns.to_owned()),
                labels: Some(BTreeMap::from([(RECORD_LABEL.to_owned(), pvc.to_owned())])),
                ..ObjectMeta::default()
            },
            ..Lease::default()
        });
        set_record(&mut lease, &record, cr, &dead);
        let result = match &current {
            Some(_) => leases
                .replace(&name, &PostParams::default(), &lease)
                .await
                .map(|_| ()),
            None => leases
                .create(&PostParams::default(), &lease)
                .await
                .map(|_| ()),
        };
        match result {
            Ok(()) => return Ok(None),
            // Someone wrote (or created, or the collector deleted) it meanwhile.
            Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => {
                last = Some(kube::Error::Api(s));
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.expect("a failed attempt recorded its error"))
}

fn set_record(lease: &mut Lease, record: &Record, cr: &CheckpointConversion, dead: &[Owner]) {
    lease.annotations_mut().insert(
        RECORD_ANNOTATION.to_owned(),
        serde_json::to_string(record).expect("a record serializes"),
    );
    let refs = lease.metadata.owner_references.get_or_insert_with(Vec::new);
    refs.retain(|r| !dead.iter().any(|d| d.uid == r.uid));
    if let Some(mine) = cr.object_ref(&()).uid
        && !refs.iter().any(|r| r.uid == mine)
    {
        refs.push(OwnerReference {
            api_version: CheckpointConversion::api_version(&()).into_owned(),
            kind: CheckpointConversion::kind(&()).into_owned(),
            name: cr.name_any(),
            uid: mine,
            ..OwnerReference::default()
        });
    }
}

/// Gives up `me`'s hold on `path`, if it has one.
async fn release(
    client: &kube::Client,
    ns: &str,
    me: &Owner,
    pvc: &str,
    path: &str,
) -> Result<(), kube::Error> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), ns);
    let name = record_name(pvc);
    for _ in 0..ATTEMPTS {
        let Some(mut lease) = leases.get_opt(&name).await? else {
            return Ok(());
        };
        let mut record = parse(&lease);
        if record.get(path) != Some(me) {
            return Ok(());
        }
        record.remove(path);
        lease.annotations_mut().insert(
            RECORD_ANNOTATION.to_owned(),
            serde_json::to_string(&record).expect("a record serializes"),
        );
        match leases.replace(&name, &PostParams::default(), &lease).await {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(kube::Error::Api(s)) if s.code == 404 => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(name: &str) -> Owner {
        Owner {
            name: name.into(),
            uid: format!("uid-{name}"),
        }
    }

    #[test]
    fn paths_that_contain_one_another_conflict() {
        assert!(overlaps("out/a", "out/a"));
        assert!(overlaps("out/a", "out/a/b"));
        assert!(overlaps("out/a/b", "out/a"));
        assert!(!overlaps("out/a", "out/ab"));
        assert!(!overlaps("out/a", "out/b"));
    }

    #[test]
    fn claims_take_free_and_dead_entries_and_keep_live_ones() {
        let mut record = Record::new();
        record.insert("out/a".into(), owner("first"));
        record.insert("out/b".into(), owner("gone"));
        let me = owner("me");
        assert_eq!(
            blockers(&record, "out/a/x", &me),
            vec![(&"out/a".to_owned(), &owner("first"))]
        );
        assert!(blockers(&record, "out/c", &me).is_empty());
        // A resource created again under the same name is not the old owner.
        let again = Owner {
            name: "first".into(),
            uid: "uid-new".into(),
        };
        assert_eq!(blockers(&record, "out/a", &again).len(), 1);
        let taken = with_claim(&record, "out/b/y", &me, &[owner("gone")]);
        assert_eq!(taken.get("out/b/y"), Some(&me));
        assert!(!taken.contains_key("out/b"));
        assert_eq!(taken.get("out/a"), Some(&owner("first")));
    }

    #[test]
    fn record_names_are_valid_lease_names() {
        assert_eq!(record_name("lustre-shared"), "ckpt-targets.lustre-shared");
        let long = "a".repeat(253);
        let n = record_name(&long);
        assert!(n.len() <= 253 && n.starts_with("ckpt-targets."), "{n}");
        assert_ne!(n, record_name(&"b".repeat(253)));
    }
}
