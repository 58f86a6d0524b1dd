//! Validation of an output directory: is it complete, does it match its manifest
//! and provenance, does it hold exactly the tensors its architecture has (names,
//! shapes, dtypes, from the configuration alone, see [`expected`]), are all values
//! finite, and does a forward pass agree with the source's ([`crate::smoke`]).
//! Run on the staging directory before every publish (so a failing output is never
//! published) and as `ckpt-convert validate PATH` / `convert/validate`.
//!
//! Report wire format (`ckpt-validation.json`, version 1; fields added since are
//! optional):
//! ```json
//! {"v": 1, "path": "…", "kind": "checkpoint_hf", "passed": 5, "failed": 0, "seconds": 1.2,
//!  "checks": [{"name": "manifest", "passed": true, "detail": "12 files match"}],
//!  "smoke_test": {"kind": "forward", "status": "passed", "detail": "…",
//!                 "comparison": {"reference": "…", "tokens": 8, "vocab": 128256,
//!                                "max_abs_diff": 0.0, "max_abs_logit": 11.2,
//!                                "tolerance": 0.00112, "seconds": 9.1}},
//!  "smoke_test_max_abs_diff": 0.0}
//! ```
//! `smoke_test.status` is `passed`, `failed` or `not_applicable`; `kind` is
//! `forward` (source and output logits) or `lora_probe` (merged tensors, where
//! `smoke_test_max_abs_diff` is the largest probe residual).

use ckpt_wire::ArtifactKind;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::formats::hf::HfCheckpoint;
use crate::formats::manifest::{self, Manifest};
use crate::formats::megatron::{self, MegatronCheckpoint};
use crate::formats::source::GlobalTensor;
use crate::smoke::{self, Arch, SmokeError, probe::ProbeReport};

pub mod expected;
pub mod scan;

/// The report file name.
pub const FILE_NAME: &str = "ckpt-validation.json";

/// One check.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// Whether it held.
    pub passed: bool,
    /// What was found (the first problems, when it failed).
    pub detail: String,
}

/// The validation report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// Format version.
    pub v: u32,
    /// The directory validated.
    pub path: PathBuf,
    /// `checkpoint_hf` or `checkpoint_megatron`.
    pub kind: ArtifactKind,
    /// Checks that held.
    pub passed: usize,
    /// Checks that failed.
    pub failed: usize,
    /// Time taken.
    pub seconds: f64,
    /// Every check.
    pub checks: Vec<Check>,
    /// The numeric smoke test, when it was asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub smoke_test: Option<SmokeTest>,
    /// The smoke test's largest absolute logit difference (for LoRA merges, the
    /// largest probe residual).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub smoke_test_max_abs_diff: Option<f64>,
    /// Greedy tokens decoded from a prompt (`generate=true`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation: Option<smoke::generate::Generation>,
}

/// The numeric smoke test in a report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SmokeTest {
    /// `forward` (logits of source and output) or `lora_probe`.
    pub kind: String,
    /// `passed`, `failed` or `not_applicable`.
    pub status: String,
    /// What was found.
    pub detail: String,
    /// The logits comparison.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comparison: Option<smoke::Comparison>,
    /// The merge probe.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe: Option<ProbeReport>,
}

/// What validation does beyond the checks of the directory itself.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The model the output was converted from (`reference=`): a forward pass of
    /// both is compared.
    pub reference: Option<PathBuf>,
    /// The HF model (`hf_model_id=`) whose config.json describes a Megatron
    /// checkpoint that has no usable run_config.yaml.
    pub hf_model: Option<PathBuf>,
    /// Run the smoke test (`smoke_test=false` skips it).
    pub smoke_test: bool,
    /// Compare both forward passes under Megatron-Core's Llama 3 rope scaling.
    pub rope_as_megatron: bool,
    /// What the processes that wrote the output read back already (the parts
    /// of a split run): taken from there, not read again.
    pub known: scan::Known,
}

impl Report {
    /// Adds a check and counts it.
    pub fn push(&mut self, check: Check) {
        if check.passed {
            self.passed += 1;
        } else {
            self.failed += 1;
        }
        self.checks.push(check);
    }

    /// Records a smoke test: its check, its section and its number.
    pub fn set_smoke_test(&mut self, t: SmokeTest, max_abs_diff: Option<f64>) {
        self.push(Check {
            name: "smoke test".into(),
            passed: t.status != "failed",
            detail: t.detail.clone(),
        });
        self.smoke_test = Some(t);
        self.smoke_test_max_abs_diff = max_abs_diff;
    }

    /// The failed checks, one line each.
    pub fn failures(&self) -> Vec<String> {
        self.checks
            .iter()
            .filter(|c| !c.passed)
            .map(|c| format!("{}: {}", c.name, c.detail))
            .collect()
    }
}

struct Checks(Vec<Check>);

impl Checks {
    fn add(&mut self, name: &str, result: Result<String, String>) {
        let (passed, detail) = match result {
            Ok(d) => (true, d),
            Err(d) => (false, d),
        };
        self.0.push(Check {
            name: name.into(),
            passed,
            detail,
        });
    }
}

fn first(problems: &[String]) -> String {
    let shown: Vec<&str> = problems.iter().take(5).map(String::as_str).collect();
    let more = if problems.len() > 5 {
        format!(" (and {} more)", problems.len() - 5)
    } else {
        String::new()
    };
    format!("{}{more}", shown.join("; "))
}

/// Validates the output directory `dir`, of `kind`. `published` says whether `dir`
/// is in its final place (then a Megatron run directory's tracker is checked too).
pub fn validate(dir: &Path, kind: ArtifactKind, published: bool) -> Report {
    validate_with(dir, kind, published, &Options::default())
}

/// [`validate`], with a smoke test against `opts.reference` when asked for.
pub fn validate_with(dir: &Path, kind: ArtifactKind, published: bool, opts: &Options) -> Report {
    let started = Instant::now();
    let mut checks = Checks(Vec::new());
    let m = Manifest::read(&dir.join(manifest::FILE_NAME));
    let manifest = m.as_ref().ok();
    let identity = manifest
        .and_then(|m| m.parameters.get("mapping"))
        .is_some_and(|v| v == "identity");
    // The checks of the weights read them once (see `scan`): the manifest's
    // digests are compared with what that read found.
    let scanned = match kind {
        ArtifactKind::CheckpointHf => validate_hf(dir, manifest, identity, opts, &mut checks),
        _ => validate_megatron(dir, manifest, identity, published, opts, &mut checks),
    };
    let mut first_checks = Checks(Vec::new());
    match &m {
        Ok(_) => {
            let known = scanned
                .as_ref()
                .map(|s| s.files.clone())
                .unwrap_or_default();
            match manifest::verify_known(dir, &known) {
                Ok(v) if v.problems.is_empty() => first_checks.add(
                    "manifest",
                    Ok(format!("{} files match their sizes and digests", v.files)),
                ),
                Ok(v) => first_checks.add("manifest", Err(first(&v.problems))),
                Err(e) => first_checks.add("manifest", Err(e)),
            }
        }
        Err(e) => first_checks.add("manifest", Err(e.clone())),
    }
    if let (Some(m), Some(s)) = (manifest, &scanned)
        && !m.output.weights_digest.is_empty()
    {
        first_checks.add(
            "weights digest",
            if s.weights_digest == m.output.weights_digest {
                let elsewhere = if s.known.1 > 0 {
                    format!(
                        " ({} of {} chunks and {} files read back by the run that wrote them)",
                        s.known.1, s.chunks, s.known.0
                    )
                } else {
                    String::new()
                };
                Ok(format!(
                    "the tensors as read back hash to the manifest's {}{elsewhere}",
                    m.output.weights_digest
                ))
            } else {
                Err(format!(
                    "the tensors as read back hash to {}, the manifest records {} (the bytes of some tensor differ from those written)",
                    s.weights_digest, m.output.weights_digest
                ))
            },
        );
    }
    first_checks.0.append(&mut checks.0);
    let checks = first_checks;
    let failed = checks.0.iter().filter(|c| !c.passed).count();
    let mut report = Report {
        v: 1,
        path: dir.to_owned(),
        kind,
        passed: checks.0.len() - failed,
        failed,
        seconds: 0.0,
        checks: checks.0,
        smoke_test: None,
        smoke_test_max_abs_diff: None,
        generation: None,
    };
    if opts.smoke_test
        && let Some(reference) = &opts.reference
    {
        let (t, diff) = forward_smoke_test(
            reference,
            dir,
            opts.hf_model.as_deref(),
            opts.rope_as_megatron,
        );
        report.set_smoke_test(t, diff);
    }
    report.seconds = started.elapsed().as_secs_f64();
    report
}

/// The forward smoke test: `reference` and `dir` through the same fixed tokens.
pub fn forward_smoke_test(
    reference: &Path,
    dir: &Path,
    hf_model: Option<&Path>,
    rope_as_megatron: bool,
) -> (SmokeTest, Option<f64>) {
    let r = open_reference(reference, hf_model, rope_as_megatron);
    forward_smoke_test_ahead(r.as_ref(), None, dir, hf_model, rope_as_megatron)
}

fn adjust_rope(m: &mut smoke::Model, rope_as_megatron: bool) {
    if rope_as_megatron
        && let Some(at) = &mut m.arch.attention
        && let Some((_, rope)) = &mut at.rope
    {
        *rope = rope.as_megatron_computes();
    }
}

/// The reference of a forward smoke test, opened (headers and configuration
/// only) so that its pass can run before the output exists.
///
/// # Errors
/// [`SmokeError`], its message naming the reference.
pub fn open_reference(
    reference: &Path,
    hf_model: Option<&Path>,
    rope_as_megatron: bool,
) -> Result<smoke::Model, SmokeError> {
    let mut r = smoke::Model::open(reference, hf_model).map_err(|e| match e {
        SmokeError::Failed(why) => SmokeError::Failed(format!("reference: {why}")),
        other => other,
    })?;
    adjust_rope(&mut r, rope_as_megatron);
    Ok(r)
}

/// [`forward_smoke_test`] against an opened reference whose pass may have run
/// ahead ([`smoke::Model::ahead`]).
pub fn forward_smoke_test_ahead(
    reference: Result<&smoke::Model, &SmokeError>,
    ahead: Option<smoke::Ahead>,
    dir: &Path,
    hf_model: Option<&Path>,
    rope_as_megatron: bool,
) -> (SmokeTest, Option<f64>) {
    let test = |status: &str, detail: String, c: Option<smoke::Comparison>| SmokeTest {
        kind: "forward".into(),
        status: status.into(),
        detail,
        comparison: c,
        probe: None,
    };
    let result = reference.map_err(Clone::clone).and_then(|r| {
        let mut o = smoke::Model::open(dir, hf_model)?;
        adjust_rope(&mut o, rope_as_megatron);
        smoke::compare_ahead(r, ahead, &o)
    });
    match result {
        Ok(c) if c.passed() => {
            let d = c.max_abs_diff;
            (test("passed", c.describe(), Some(c)), Some(d))
        }
        Ok(c) => {
            let d = c.max_abs_diff;
            (
                test(
                    "failed",
                    format!("logits differ from the reference's: {}", c.describe()),
                    Some(c),
                ),
                Some(d),
            )
        }
        Err(SmokeError::NotApplicable(why)) => (
            test("not_applicable", format!("not applicable: {why}"), None),
            None,
        ),
        Err(e) => (test("failed", e.to_string(), None), None),
    }
}

/// The merge probe as a smoke test.
pub fn probe_smoke_test(result: Result<ProbeReport, String>) -> (SmokeTest, Option<f64>) {
    match result {
        Ok(p) => {
            let passed = p.failures.is_empty();
            let detail = if passed {
                format!(
                    "{} merged tensors × 2 random vectors agree with base + s·B·A: largest residual {:.3e}, {:.2} of the rounding tolerance",
                    p.tensors, p.max_abs_diff, p.worst_ratio
                )
            } else {
                format!(
                    "{} of {} merged tensors disagree with base + s·B·A: {}",
                    p.failures.len(),
                    p.tensors,
                    first(&p.failures)
                )
            };
            let d = p.max_abs_diff;
            (
                SmokeTest {
                    kind: "lora_probe".into(),
                    status: if passed { "passed" } else { "failed" }.into(),
                    detail,
                    comparison: None,
                    probe: Some(p),
                },
                Some(d),
            )
        }
        Err(e) => (
            SmokeTest {
                kind: "lora_probe".into(),
                status: "failed".into(),
                detail: e,
                comparison: None,
                probe: None,
            },
            None,
        ),
    }
}

/// Side files against the digests the manifest recorded at conversion.
fn side_files_check(dir: &Path, m: &Manifest, checks: &mut Checks) {
    let mut problems = Vec::new();
    for f in &m.provenance.side_files {
        let path = dir.join(&f.path);
        if !path.is_file() {
            problems.push(format!("{} ({}) is missing", f.path, f.kind));
            continue;
        }
        match crate::formats::digest::file(&path) {
            Ok((_, d)) if f.xxh3.is_empty() || d == f.xxh3 => {}
            Ok((_, d)) => problems.push(format!(
                "{} ({}) differs from the provenance recorded at conversion (xxh3 {d}, expected {})",
                f.path, f.kind, f.xxh3
            )),
            Err(e) => problems.push(format!("{}: {e}", f.path)),
        }
    }
    checks.add(
        "tokenizer and config files",
        if problems.is_empty() {
            Ok(format!(
                "{} side files present, digests equal to the provenance",
                m.provenance.side_files.len()
            ))
        } else {
            Err(first(&problems))
        },
    );
}

/// generation_config.json travels with an HF output when the source had one.
fn generation_config_check(dir: &Path, m: &Manifest, checks: &mut Checks) {
    let recorded = m
        .provenance
        .side_files
        .iter()
        .any(|f| f.path == "generation_config.json");
    let source_has = m
        .provenance
        .sources
        .iter()
        .filter(|s| s.kind == ArtifactKind::CheckpointHf)
        .map(|s| Path::new(&s.path).join("generation_config.json"))
        .find(|p| p.is_file());
    let present = dir.join("generation_config.json").is_file();
    let result = match (recorded, &source_has, present) {
        (_, _, true) => Ok("present".into()),
        (true, _, false) => {
            Err("generation_config.json is missing (the provenance lists it)".into())
        }
        (false, Some(p), false) => Err(format!(
            "generation_config.json is missing, but the source has one ({})",
            p.display()
        )),
        (false, None, false) => Ok("the source has none".into()),
    };
    checks.add("generation_config.json", result);
}

fn architecture_check<N>(
    tensors: &[GlobalTensor],
    arch: Result<((Arch, String), N), String>,
    identity: bool,
    build: impl Fn(&Arch, &N) -> Vec<expected::Expected>,
    dtype_from_config: bool,
    checks: &mut Checks,
) {
    if identity {
        checks.add(
            "architecture tensors",
            Ok("not applicable: mapping=identity keeps the source's names".into()),
        );
        return;
    }
    match arch {
        Ok(((arch, source), names)) => {
            let want = build(&arch, &names);
            let dtype = if dtype_from_config { arch.dtype } else { None };
            checks.add(
                "architecture tensors",
                expected::check(tensors, &want, dtype, &source).map_err(|p| first(&p)),
            );
        }
        Err(why) => checks.add("architecture tensors", Ok(format!("not applicable: {why}"))),
    }
}

fn validate_hf(
    dir: &Path,
    m: Option<&Manifest>,
    identity: bool,
    opts: &Options,
    checks: &mut Checks,
) -> Option<scan::Scan> {
    checks.add(
        "config",
        if dir.join("config.json").is_file() {
            crate::formats::hf::read_config(dir)
                .map(|_| "config.json is valid JSON".into())
                .map_err(|e| e.to_string())
        } else {
            Err("config.json is missing: transformers cannot load the directory".into())
        },
    );
    let scanned = match HfCheckpoint::open(dir) {
        Ok(ckpt) => {
            checks.add(
                "weights",
                Ok(format!(
                    "{} tensors in {} safetensors files, every index entry present",
                    ckpt.tensors.len(),
                    ckpt.shards.len()
                )),
            );
            if let Some(m) = m {
                let expected = m.output.tensors;
                checks.add(
                    "tensor count",
                    if ckpt.tensors.len() == expected {
                        Ok(format!("{expected} tensors, as planned"))
                    } else {
                        Err(format!(
                            "expected {expected} tensors (manifest), found {}",
                            ckpt.tensors.len()
                        ))
                    },
                );
            }
            let arch = smoke::hf_arch(dir)
                .map(|a| (a, "config.json".to_owned()))
                .map_err(|e| e.to_string());
            let with_names = arch.and_then(|(a, s)| {
                let names = a.hf_names()?;
                Ok((a, s, names))
            });
            let has_head = with_names
                .as_ref()
                .is_ok_and(|(_, _, n)| ckpt.tensor(n.head).is_some());
            architecture_check(
                &ckpt.tensors,
                with_names.map(|(a, s, n)| ((a, s), n)),
                identity,
                |a, n| expected::hf(a, n, has_head),
                false,
                checks,
            );
            let scanned = scan::scan(dir, &ckpt.files, &ckpt.tensors, &opts.known);
            finite_check(&scanned, checks);
            Some(scanned)
        }
        Err(e) => {
            checks.add("weights", Err(e.to_string()));
            None
        }
    };
    if let Some(m) = m {
        side_files_check(dir, m, checks);
        generation_config_check(dir, m, checks);
    }
    scanned
}

fn finite_check(scanned: &scan::Scan, checks: &mut Checks) {
    checks.add(
        "finite",
        if scanned.non_finite.is_empty() {
            Ok("no NaN or infinite values".into())
        } else {
            Err(first(&scanned.non_finite))
        },
    );
}

fn validate_megatron(
    dir: &Path,
    m: Option<&Manifest>,
    identity: bool,
    published: bool,
    opts: &Options,
    checks: &mut Checks,
) -> Option<scan::Scan> {
    checks.add(
        "metadata.json",
        match crate::formats::file::read_text(
            &dir.join("metadata.json"),
            crate::formats::file::limit::CONFIG,
        ) {
            Ok(t)
                if serde_json::from_str::<serde_json::Value>(&t)
                    .ok()
                    .and_then(|v| v.get("sharded_backend").cloned())
                    == Some("torch_dist".into()) =>
            {
                Ok("torch_dist backend".into())
            }
            Ok(t) => Err(format!("expected sharded_backend torch_dist, found {t:?}")),
            Err(e) => Err(format!("missing: {e}")),
        },
    );
    for f in ["common.pt", "run_config.yaml"] {
        checks.add(
            f,
            if dir.join(f).is_file() {
                Ok("present".into())
            } else {
                Err("missing".into())
            },
        );
    }
    let scanned = match MegatronCheckpoint::open(dir) {
        Ok(ckpt) => {
            checks.add(
                "items",
                Ok(format!(
                    "{} tensors and {} bytes items, every item inside its .distcp file and consistent with .metadata",
                    ckpt.tensors.len(),
                    ckpt.byte_items.len()
                )),
            );
            let arch =
                smoke::megatron_arch(dir, opts.hf_model.as_deref()).map_err(|e| e.to_string());
            let layout = expected::Layout::of(&ckpt.tensors);
            let has_output = ckpt.tensor("output_layer.weight").is_some();
            let from_rc = arch.as_ref().is_ok_and(|(_, s)| s == "run_config.yaml");
            if let Ok((a, _)) = &arch
                && !identity
                && m.is_some_and(|m| m.step == ckpt_wire::Step::HfToMegatron.name())
            {
                checks.add("vocab padding", padding_check(&ckpt, a.vocab));
            }
            architecture_check(
                &ckpt.tensors,
                arch.map(|a| (a, ())),
                identity,
                |a, _| expected::megatron(a, layout, has_output),
                from_rc,
                checks,
            );
            let scanned = scan::scan(dir, &ckpt.files, &ckpt.tensors, &opts.known);
            finite_check(&scanned, checks);
            Some(scanned)
        }
        Err(e) => {
            checks.add("items", Err(e.to_string()));
            None
        }
    };
    if let Some(m) = m
        && !m.provenance.side_files.is_empty()
    {
        side_files_check(dir, m, checks);
    }
    if published && let Some(run) = dir.parent() {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if let Some(iteration) = megatron::parse_iter_dir_name(&name) {
            checks.add(
                "tracker",
                match megatron::read_tracker(run) {
                    Some(Ok(Some(n))) if n == iteration => {
                        Ok(format!("{} names {n}", megatron::TRACKER))
                    }
                    Some(Ok(other)) => Err(format!(
                        "{} names {other:?}, not {iteration}",
                        megatron::TRACKER
                    )),
                    Some(Err(e)) => Err(e),
                    None => Err(format!(
                        "{} is missing in {}",
                        megatron::TRACKER,
                        run.display()
                    )),
                },
            );
        }
    }
    scanned
}

/// The rows an import adds to reach a padded vocabulary are zeros (as
/// Megatron-Bridge pads); a non-zero row there means the rows were shifted or the
/// padding was filled from somewhere else.
fn padding_check(ckpt: &MegatronCheckpoint, vocab: usize) -> Result<String, String> {
    let mut padded = 0;
    let mut problems = Vec::new();
    for name in ["embedding.word_embeddings.weight", "output_layer.weight"] {
        let Some(t) = ckpt.tensor(name) else { continue };
        if t.shape.len() != 2 || t.shape[0] <= vocab as u64 || !t.dtype.is_float() {
            continue;
        }
        let (rows, cols) = (t.shape[0] - vocab as u64, t.shape[1]);
        padded += rows;
        let mut buf = vec![0f32; (rows * cols) as usize];
        match smoke::kernels::read_box_f32(
            &ckpt.files,
            t,
            &[vocab as u64, 0],
            &[rows, cols],
            &mut buf,
            None,
        ) {
            Ok(()) => {
                let nonzero = buf
                    .chunks_exact(cols as usize)
                    .filter(|r| r.iter().any(|v| *v != 0.0))
                    .count();
                if nonzero > 0 {
                    problems.push(format!(
                        "tensor {name:?}: {nonzero} of the {rows} padding rows beyond the vocabulary of {vocab} are not zero (rows shifted, or padding filled from elsewhere)"
                    ));
                }
            }
            Err(e) => problems.push(e),
        }
    }
    if problems.is_empty() {
        Ok(if padded == 0 {
            format!("no padding beyond the vocabulary of {vocab}")
        } else {
            format!("{padded} padding rows beyond the vocabulary of {vocab} are zero")
        })
    } else {
        Err(first(&problems))
    }
}
