//! The stages of one step, in order: the plan a step built is executed into a
//! staging directory beside the target, described by a manifest, validated, and
//! only then committed by rename.
//!
//! Preflight ([`preflight`]) runs before a plan exists; [`stage`] carries a plan
//! through execute, manifest and validation; [`Staged::commit`] publishes. The
//! [`Report`] and the orchestrator's summary ([`report`]) come out at the end.
//! A conversion split across processes ([`split`]) runs the same stages: each
//! part executes its share of the plan into a shared staging directory, and
//! the final step carries the whole through manifest, validation and commit.

pub mod error;
pub mod preflight;
pub mod report;
pub mod reuse;
pub mod split;

use ckpt_wire::ArtifactKind;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::execute::{self, Outcome, Progress};
use ckpt_wire::Step;

use crate::formats::FormatError;
use crate::formats::file::Identity;
use crate::formats::hf;
use crate::formats::manifest::{self, Manifest};
use crate::pipeline::error::Error;
use crate::plan::{Plan, TensorStore};
use crate::publish::Staging;

/// Settings shared by every step.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Print the plan and stop.
    pub dry_run: bool,
    /// Replace an existing output.
    pub overwrite: bool,
    /// Validate the output before publishing it.
    pub validate: bool,
    /// Include the numeric smoke test in that validation (`smoke_test=false`
    /// skips only the forward pass or merge probe).
    pub smoke_test: bool,
    /// Execution settings.
    pub exec: execute::Options,
    /// Called with every plan before any data moves (the property tests check
    /// each plan's reads and layout with it).
    pub plan_check: Option<PlanCheck>,
    /// The run is one part, or the final step, of a split conversion.
    pub split: Option<split::Split>,
}

/// A check of a plan and the stores it reads, before any data moves.
pub type PlanCheck = fn(&Plan, &[&dyn TensorStore]);

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            dry_run: false,
            overwrite: false,
            validate: true,
            smoke_test: true,
            exec: execute::Options::default(),
            plan_check: None,
            split: None,
        }
    }
}

/// The result of a step, printed as a summary or as JSON (`--json`).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The step.
    pub step: String,
    /// `succeeded` or `planned` (dry run).
    pub status: String,
    /// The output directory.
    pub output: PathBuf,
    /// `checkpoint_hf` or `checkpoint_megatron`.
    pub kind: ArtifactKind,
    /// Tensors written (or planned).
    pub tensors: usize,
    /// Tensor bytes.
    pub tensor_bytes: u64,
    /// Files written.
    pub files: usize,
    /// Wall time.
    pub seconds: f64,
    /// Tensor bytes per second.
    pub bytes_per_second: f64,
    /// Most bytes of pieces in flight at once.
    pub peak_in_flight_bytes: u64,
    /// Layout-independent digest of the output tensors.
    pub weights_digest: String,
    /// The manifest written with the output.
    pub manifest: Option<PathBuf>,
    /// The validation run before publishing (unless `validate=false`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub validation: Option<ValidationSummary>,
    /// The plan, one line per output tensor (dry run only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub plan: Vec<String>,
    /// Source tensors not converted, with the reason.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<String>,
    /// Things the user should know.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// The target already held this conversion's output, recognised by its
    /// manifest; nothing was rewritten.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub reused: bool,
    /// Further outputs of the same step, published with this one (the merged
    /// Megatron checkpoint of `convert/merge_lora backend=megatron_bridge`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub other_outputs: Vec<Report>,
}

/// What validation found, in a report.
#[derive(Debug, Clone, Serialize)]
pub struct ValidationSummary {
    /// Checks that held.
    pub passed: usize,
    /// Checks that failed.
    pub failed: usize,
    /// Time taken.
    pub seconds: f64,
    /// The full report next to the output.
    pub report: PathBuf,
    /// The smoke test's outcome: `passed`, `failed`, `not_applicable`, or absent
    /// when skipped (`smoke_test=false`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub smoke_test: Option<String>,
    /// The smoke test's largest absolute logit difference (for merges, the
    /// largest probe residual).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub smoke_test_max_abs_diff: Option<f64>,
}

/// An input's identity for the manifest.
pub struct SourceInfo {
    /// The parameter that named it.
    pub role: String,
    /// Its path.
    pub path: PathBuf,
    /// Its artifact kind.
    pub kind: ArtifactKind,
    /// Files with header digests.
    pub files: Vec<manifest::SourceFile>,
}

/// Identity of an HF model directory: its shards with header digests (when it
/// has weights), and the digests of its config and index.
pub fn hf_source_info(role: &str, dir: &Path, ckpt: Option<&hf::HfCheckpoint>) -> SourceInfo {
    let mut files: Vec<manifest::SourceFile> = ckpt
        .map(|c| c.headers.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|(name, header)| manifest::SourceFile {
            path: name.clone(),
            size: std::fs::metadata(dir.join(name)).map_or(0, |m| m.len()),
            header_xxh3: Some(crate::formats::digest::hex(header)),
        })
        .collect();
    for name in ["config.json", hf::INDEX_FILE] {
        if let Ok(Some(bytes)) =
            crate::formats::file::read_opt(&dir.join(name), crate::formats::file::limit::INDEX)
        {
            files.push(manifest::SourceFile {
                path: name.into(),
                size: bytes.len() as u64,
                header_xxh3: Some(crate::formats::digest::hex(&bytes)),
            });
        }
    }
    SourceInfo {
        role: role.into(),
        path: dir.to_owned(),
        kind: ArtifactKind::CheckpointHf,
        files,
    }
}

/// Identity of a Megatron source: its `.metadata` digest and data files.
pub fn megatron_source_info(
    role: &str,
    ckpt: &crate::formats::megatron::MegatronCheckpoint,
) -> SourceInfo {
    let mut files = vec![manifest::SourceFile {
        path: ".metadata".into(),
        size: ckpt.metadata_bytes.len() as u64,
        header_xxh3: Some(crate::formats::digest::hex(&ckpt.metadata_bytes)),
    }];
    for f in ckpt.files.iter() {
        files.push(manifest::SourceFile {
            path: f
                .path
                .strip_prefix(&ckpt.dir)
                .unwrap_or(&f.path)
                .to_string_lossy()
                .into_owned(),
            size: f.len(),
            header_xxh3: None,
        });
    }
    SourceInfo {
        role: role.into(),
        path: ckpt.dir.clone(),
        kind: ArtifactKind::CheckpointMegatron,
        files,
    }
}

/// Where and how the output is published.
pub struct Target {
    /// The directory that receives the plan's files.
    pub dir: PathBuf,
    /// `checkpoint_hf` or `checkpoint_megatron`.
    pub kind: ArtifactKind,
    /// For Megatron outputs: the run directory and iteration, whose tracker files
    /// are updated after the iteration directory is in place.
    pub run_dir: Option<(PathBuf, u64)>,
    /// The model the output was converted from, whose forward pass the output's
    /// must reproduce (the smoke test), when the mapping is a family's.
    pub reference: Option<PathBuf>,
    /// The HF model whose config.json describes a Megatron side without a usable
    /// run_config.yaml.
    pub hf_model: Option<PathBuf>,
    /// Compare the forward passes under Megatron-Core's Llama 3 rope scaling (the
    /// conversion was asked to accept a scaling Megatron-Core cannot express).
    pub rope_as_megatron: bool,
}

/// Runs a plan and publishes it: staging, execute, manifest, rename, trackers.
///
/// # Errors
/// [`Error`] from any stage; a failure leaves no target.
#[allow(clippy::too_many_arguments)]
pub fn execute_and_publish(
    step: Step,
    parameters: &BTreeMap<String, String>,
    plan: Plan,
    stores: &[&dyn TensorStore],
    sources: Vec<SourceInfo>,
    target: Target,
    opts: &RunOptions,
    progress: &dyn Progress,
    warnings: Vec<String>,
) -> Result<Report, Error> {
    match stage(
        step, parameters, plan, stores, sources, target, opts, progress, warnings, None,
    )? {
        Prepared::Planned(report) | Prepared::Partial(report) => Ok(report),
        Prepared::Staged(staged) => staged.commit(progress),
    }
}

/// A check of what execution read and wrote, run after the output is complete in
/// staging and before it is published (a base's identity, computed from its
/// tensors as they were read). An error leaves nothing published.
pub type OutcomeCheck<'a> = &'a (dyn Fn(&Outcome) -> Result<(), Error> + Sync);

/// A plan carried as far as it goes without publishing.
pub enum Prepared {
    /// A dry run: the plan, described.
    Planned(Report),
    /// An output complete in staging, with its manifest, validated.
    Staged(Staged),
    /// One part of a split run, written into the shared staging directory;
    /// nothing to publish ([`split`]).
    Partial(Report),
}

/// An output complete in staging, validated, waiting for [`Staged::commit`].
/// Dropping it removes the staging directory.
pub struct Staged {
    /// `None` when the target already held this output ([`reuse`]).
    staging: Option<Staging>,
    report: Report,
    run_dir: Option<(PathBuf, u64)>,
    overwrite: bool,
    started: Instant,
}

impl Staged {
    /// Publishes the output: rename into place, then the run directory's trackers.
    ///
    /// # Errors
    /// [`Error::Publish`] when the rename or a tracker write fails.
    pub fn commit(self, progress: &dyn Progress) -> Result<Report, Error> {
        let Staged {
            staging,
            mut report,
            run_dir,
            overwrite,
            started,
        } = self;
        let reused = staging.is_none();
        if let Some(staging) = staging {
            staging.commit(overwrite)?;
            crate::failpoint::hit("committed");
        }
        // A reused output's run directory keeps its trackers unless they are
        // missing (the first run was killed between its rename and this).
        if let Some((run_dir, iteration)) = run_dir.as_ref().filter(|(d, _)| {
            !reused || std::fs::symlink_metadata(d.join(crate::formats::megatron::TRACKER)).is_err()
        }) {
            crate::publish::write_atomic(
                &run_dir.join(crate::formats::megatron::TRACKER),
                iteration.to_string().as_bytes(),
            )?;
            crate::publish::write_atomic(
                &run_dir.join("latest_train_state.pt"),
                &crate::formats::megatron::train_state_pt(*iteration),
            )?;
        }
        progress.finish();
        report.seconds = started.elapsed().as_secs_f64();
        report.bytes_per_second = report.tensor_bytes as f64 / report.seconds.max(1e-9);
        Ok(report)
    }
}

/// Runs a plan into a staging directory beside the target: execute, `check`,
/// manifest, validation. Nothing is published; see [`Staged::commit`].
///
/// # Errors
/// [`Error`] from any stage, or from `check`; the staging directory is removed.
#[allow(clippy::too_many_arguments)]
pub fn stage(
    step: Step,
    parameters: &BTreeMap<String, String>,
    plan: Plan,
    stores: &[&dyn TensorStore],
    sources: Vec<SourceInfo>,
    target: Target,
    opts: &RunOptions,
    progress: &dyn Progress,
    warnings: Vec<String>,
    check: Option<OutcomeCheck<'_>>,
) -> Result<Prepared, Error> {
    let started = Instant::now();
    let role = opts
        .split
        .as_ref()
        .map(split::Split::role)
        .transpose()?
        .flatten();
    // A split run's output is the single run's: its manifest records the
    // conversion's parameters only.
    let conversion;
    let parameters = match role {
        Some(_) => {
            conversion = split::conversion_parameters(parameters);
            &conversion
        }
        None => parameters,
    };
    let skipped: Vec<String> = plan
        .skipped
        .iter()
        .map(|(n, why)| format!("{n}: {why}"))
        .collect();
    if let Some(check) = opts.plan_check {
        check(&plan, stores);
    }
    if opts.dry_run {
        execute::check(&plan, stores)?;
        return Ok(Prepared::Planned(Report {
            step: step.name().into(),
            status: "planned".into(),
            output: target.dir,
            kind: target.kind,
            tensors: plan.pieces.len(),
            tensor_bytes: plan.tensor_bytes(),
            files: plan.files.len() + plan.generated.len() + plan.copied.len(),
            seconds: started.elapsed().as_secs_f64(),
            bytes_per_second: 0.0,
            peak_in_flight_bytes: 0,
            weights_digest: String::new(),
            manifest: None,
            validation: None,
            plan: plan.describe(stores),
            skipped,
            warnings,
            reused: false,
            other_outputs: Vec::new(),
        }));
    }
    // Without --overwrite, an existing output is this conversion's (then done) or
    // refused; with it, it is replaced whatever it holds.
    if !opts.overwrite && std::fs::symlink_metadata(&target.dir).is_ok() {
        match reuse::check(step, parameters, &sources, &plan, &target) {
            Ok(mut report) => {
                report.warnings.extend(warnings);
                return Ok(Prepared::Staged(Staged {
                    staging: None,
                    report,
                    run_dir: target.run_dir,
                    overwrite: opts.overwrite,
                    started,
                }));
            }
            Err(why) => {
                return Err(preflight::PreflightError::Occupied {
                    path: target.dir,
                    why,
                }
                .into());
            }
        }
    }
    // A part of a split run writes its share and stops; the final step checks
    // the parts against this plan before it takes their staging directory.
    let finalize = match role {
        None => None,
        Some(role) => {
            let fingerprint = split::fingerprint(step, parameters, &plan, &sources);
            match role {
                split::Role::Part { part, workers } => {
                    return split::run_part(
                        step,
                        &plan,
                        stores,
                        &fingerprint,
                        &target,
                        (part, workers),
                        opts,
                        progress,
                        warnings,
                    )
                    .map(Prepared::Partial);
                }
                split::Role::Finalize { workers } => Some(split::Finalize::check(
                    &plan,
                    &fingerprint,
                    &target.dir,
                    workers,
                )?),
            }
        }
    };
    let staging = match &finalize {
        Some(f) => f.adopt(&plan, &target.dir)?,
        None => Staging::new(&target.dir)?,
    };
    // The final step of a split run writes only what lies outside the parts'
    // files; its outcome is then the whole plan's, from the parts' records.
    let side_plan = finalize.as_ref().map(|_| split::Finalize::side_plan(&plan));
    let executed_plan = side_plan.as_ref().unwrap_or(&plan);
    // Side files are read once, by the copy; their identity now is what the
    // copy must still see when the output is complete.
    let copied: Vec<(PathBuf, Identity)> = plan
        .copied
        .iter()
        .map(|c| {
            std::fs::metadata(&c.from)
                .map(|m| (c.from.clone(), Identity::of(&m)))
                .map_err(|e| FormatError::io(&c.from, e))
        })
        .collect::<Result<_, _>>()?;
    let merged = plan.pieces.iter().any(|p| p.merge.is_some());
    let smoke = opts.validate && opts.smoke_test;
    // A merge's smoke test: every merged tensor probed against base + s·B·A as
    // it is written.
    let probe = (smoke && merged).then(|| crate::smoke::probe::Probe::new(stores));
    // A split merge's pieces were probed by the parts that wrote them.
    if let (Some(f), Some(p)) = (&finalize, &probe) {
        f.feed(p);
    }
    let observer: &dyn execute::Observer = match &probe {
        Some(p) => p,
        None => &execute::Unobserved,
    };
    // A conversion's: the reference's forward pass runs while the conversion
    // writes, the output's once it is written.
    let reference = match (&target.reference, smoke && !merged) {
        (Some(r), true) => Some(crate::validate::open_reference(
            r,
            target.hf_model.as_deref(),
            target.rope_as_megatron,
        )),
        _ => None,
    };
    // The dtype the output's weights will have, if the plan gives them one.
    let planned_dtype = {
        let mut floats = plan.pieces.iter().map(|p| p.dtype).filter(|d| d.is_float());
        let first = floats.next();
        first.filter(|f| floats.all(|d| d == *f))
    };
    let pool = opts.exec.pool(execute::WORKERS)?;
    // The reference's pass gets workers of its own: the conversion's mostly wait
    // for the disk while it computes.
    let ahead_pool = match reference {
        Some(Ok(_)) => Some(opts.exec.pool("ahead")?),
        _ => None,
    };
    let mut whole = None;
    let (outcome, validation) = pool.install(|| {
        std::thread::scope(|scope| {
            let ahead = reference
                .as_ref()
                .and_then(|r| r.as_ref().ok())
                .zip(ahead_pool.as_ref())
                .and_then(|(r, p)| {
                    // Named, or it would take the name of the worker it starts from.
                    // Without the thread the smoke test computes the reference itself.
                    std::thread::Builder::new()
                        .name("ckpt-reference".into())
                        .spawn_scoped(scope, || p.install(|| r.ahead(planned_dtype)))
                        .ok()
                });
            execute::execute_with(
                executed_plan,
                stores,
                staging.path(),
                &opts.exec,
                progress,
                observer,
                |executed| -> Result<Option<crate::validate::Report>, Error> {
                    let outcome: &Outcome = match &finalize {
                        Some(f) => whole.insert(f.outcome(executed, &plan, stores.len())),
                        None => executed,
                    };
                    crate::failpoint::hit("executed");
                    if let Some(check) = check {
                        check(outcome)?;
                    }
                    write_manifest(
                        step,
                        parameters,
                        &plan,
                        outcome,
                        sources,
                        &target,
                        staging.path(),
                    )?;
                    if !opts.validate {
                        return Ok(None);
                    }
                    let ahead = ahead.map(|h| h.join().expect("the reference pass does not panic"));
                    validate_staged(
                        &plan,
                        &target,
                        staging.path(),
                        opts,
                        progress,
                        outcome,
                        reference.as_ref(),
                        ahead,
                        probe.as_ref(),
                        read_back_known(&plan, outcome),
                    )
                    .map(Some)
                },
            )
        })
    })?;
    let outcome = whole.unwrap_or(outcome);
    // A source that moved while we read it makes the output untrustworthy,
    // whatever validation said (it read the same moving source), and it is the
    // cause to name when validation failed too: the smoke test's reference may
    // have read the source after it changed, the conversion before.
    for store in stores {
        store.files().check_unchanged()?;
    }
    for (path, identity) in &copied {
        identity.check(path)?;
    }
    let validation = validation?;
    crate::failpoint::hit("validated");
    if finalize.is_some() {
        split::Finalize::clear(staging.path())?;
    }
    let report = Report {
        step: step.name().into(),
        status: "succeeded".into(),
        output: target.dir.clone(),
        kind: target.kind,
        tensors: outcome.pieces,
        tensor_bytes: outcome.tensor_bytes,
        files: outcome.files.len() + 1,
        seconds: 0.0,
        bytes_per_second: 0.0,
        peak_in_flight_bytes: outcome.peak_in_flight,
        weights_digest: outcome.weights_digest,
        manifest: Some(target.dir.join(manifest::FILE_NAME)),
        validation: validation.map(|v| ValidationSummary {
            passed: v.passed,
            failed: v.failed,
            seconds: v.seconds,
            report: target.dir.join(crate::validate::FILE_NAME),
            smoke_test: v.smoke_test.as_ref().map(|t| t.status.clone()),
            smoke_test_max_abs_diff: v.smoke_test_max_abs_diff,
        }),
        plan: Vec::new(),
        skipped,
        warnings,
        reused: false,
        other_outputs: Vec::new(),
    };
    Ok(Prepared::Staged(Staged {
        staging: Some(staging),
        report,
        run_dir: target.run_dir,
        overwrite: opts.overwrite,
        started,
    }))
}

/// Writes the manifest of a staged output.
fn write_manifest(
    step: Step,
    parameters: &BTreeMap<String, String>,
    plan: &Plan,
    outcome: &Outcome,
    sources: Vec<SourceInfo>,
    target: &Target,
    staging: &Path,
) -> Result<(), Error> {
    let side_files = plan
        .copied
        .iter()
        .map(|c| manifest::SideFile {
            path: c.rel.clone(),
            kind: c.kind.clone(),
            from: c.from.display().to_string(),
            xxh3: outcome
                .files
                .iter()
                .find(|f| f.path == c.rel)
                .map(|f| f.xxh3.clone())
                .unwrap_or_default(),
        })
        .collect();
    let m = Manifest {
        format: "ckpt-manifest".into(),
        version: 1,
        tool: manifest::tool(),
        created: manifest::now_rfc3339(),
        step: step.name().into(),
        parameters: parameters.clone(),
        output: manifest::Output {
            kind: target.kind,
            iteration: target.run_dir.as_ref().map(|(_, i)| *i),
            tensors: outcome.pieces,
            tensor_bytes: outcome.tensor_bytes,
            weights_digest: outcome.weights_digest.clone(),
        },
        files: outcome.files.clone(),
        provenance: manifest::Provenance {
            sources: sources
                .into_iter()
                .enumerate()
                .map(|(i, s)| manifest::Source {
                    role: s.role,
                    path: s.path.display().to_string(),
                    kind: s.kind,
                    weights_digest: outcome.source_digests.get(i).cloned(),
                    files: s.files,
                })
                .collect(),
            side_files,
        },
    };
    crate::publish::write_atomic(&staging.join(manifest::FILE_NAME), m.to_json().as_bytes())?;
    Ok(())
}

/// What execution read back once every piece was written (by the parts, for a
/// split run's final step), by where it lies, for validation to take instead of
/// reading the same bytes again: each tensor file's digest, and each piece's
/// data's digest and count of NaN and infinite values.
fn read_back_known(plan: &Plan, outcome: &Outcome) -> crate::validate::scan::Known {
    let mut known = crate::validate::scan::Known::default();
    for p in &plan.pieces {
        if let Some(&found) = outcome.read_back.get(&p.name) {
            let (file, offset) = execute::data_at(p);
            known.ranges.insert(
                (plan.files[file].rel.clone(), offset, p.nbytes(), p.dtype),
                found,
            );
        }
    }
    for f in &outcome.files {
        known.files.insert(f.path.clone(), (f.size, f.xxh3.clone()));
    }
    known
}

/// Validates a staged output before it is published (an output that fails is
/// never put in place), with the smoke test that fits it: the reference's pass
/// (run ahead) against the output's, or the probe that ran as the merge wrote.
#[allow(clippy::too_many_arguments)]
fn validate_staged(
    plan: &Plan,
    target: &Target,
    staging: &Path,
    opts: &RunOptions,
    progress: &dyn Progress,
    outcome: &Outcome,
    reference: Option<&Result<crate::smoke::Model, crate::smoke::SmokeError>>,
    ahead: Option<crate::smoke::Ahead>,
    probe: Option<&crate::smoke::probe::Probe<'_>>,
    known: crate::validate::scan::Known,
) -> Result<crate::validate::Report, Error> {
    progress.phase("validate", outcome.tensor_bytes);
    let vopts = crate::validate::Options {
        reference: None,
        hf_model: target.hf_model.clone(),
        smoke_test: false,
        rope_as_megatron: target.rope_as_megatron,
        known,
    };
    // The checks beside the output's forward pass. The tensor files' bytes are
    // not read again: execution read each file back once, its digest and each
    // piece's (`known`), and the checks take those where the reader finds each
    // chunk at the place execution read.
    let started = Instant::now();
    let (mut v, forward) = rayon::join(
        || crate::validate::validate_with(staging, target.kind, false, &vopts),
        || {
            reference.map(|r| {
                crate::validate::forward_smoke_test_ahead(
                    r.as_ref(),
                    ahead,
                    staging,
                    target.hf_model.as_deref(),
                    target.rope_as_megatron,
                )
            })
        },
    );
    v.seconds = started.elapsed().as_secs_f64();
    if let Some((t, diff)) = forward {
        v.set_smoke_test(t, diff);
    } else if let Some(p) = probe {
        let (t, diff) = crate::validate::probe_smoke_test(Ok(p.report(plan)));
        v.set_smoke_test(t, diff);
    } else if opts.smoke_test {
        v.set_smoke_test(
            crate::validate::SmokeTest {
                kind: "forward".into(),
                status: "not_applicable".into(),
                detail: "not applicable: no reference model for a forward pass (mapping=identity keeps the source's names) and no merged tensors to probe".into(),
                comparison: None,
                probe: None,
            },
            None,
        );
    }
    v.path = target.dir.clone();
    let mut text = serde_json::to_string_pretty(&v).expect("report serializes");
    text.push('\n');
    crate::publish::write_atomic(&staging.join(crate::validate::FILE_NAME), text.as_bytes())?;
    if v.failed > 0 {
        return Err(error::ValidationError::ChecksFailed {
            output: target.dir.clone(),
            total: v.passed + v.failed,
            failures: v.failures(),
        }
        .into());
    }
    Ok(v)
}

/// Resolves an output `megatron_path`: a run directory (we write `iter_NNNNNNN`
/// inside it) or a path ending in `iter_NNNNNNN` (its parent is the run directory).
/// Returns (run directory, iteration directory, iteration).
pub fn resolve_megatron_output(path: &Path, default_iteration: u64) -> (PathBuf, PathBuf, u64) {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    match crate::formats::megatron::parse_iter_dir_name(&name) {
        Some(iteration) => {
            let run = path
                .parent()
                .map(Path::to_owned)
                .unwrap_or_else(|| PathBuf::from("."));
            (run, path.to_owned(), iteration)
        }
        None => (
            path.to_owned(),
            path.join(crate::formats::megatron::iter_dir_name(default_iteration)),
            default_iteration,
        ),
    }
}

/// The parameters of a step as a sorted map, from `key=value` pairs.
pub fn param_map<I: IntoIterator<Item = (String, String)>>(pairs: I) -> BTreeMap<String, String> {
    pairs.into_iter().collect()
}
