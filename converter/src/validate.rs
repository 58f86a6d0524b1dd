//! Validation of an output directory: is it complete, does it match its manifest,
//! are all values finite. Run on the staging directory before every publish (so a
//! failing output is never published) and as `ckpt-convert validate PATH`.
//!
//! Report wire format (`ckpt-validation.json`, version 1):
//! ```json
//! {"v": 1, "path": "…", "kind": "checkpoint_hf", "passed": 5, "failed": 0, "seconds": 1.2,
//!  "checks": [{"name": "manifest", "passed": true, "detail": "12 files match"}]}
//! ```

use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;

use crate::dtype::DType;
use crate::formats::hf::HfCheckpoint;
use crate::formats::megatron::{self, MegatronCheckpoint};
use crate::manifest::{self, Manifest};
use crate::source::{Files, GlobalTensor};

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
    pub kind: String,
    /// Checks that held.
    pub passed: usize,
    /// Checks that failed.
    pub failed: usize,
    /// Time taken.
    pub seconds: f64,
    /// Every check.
    pub checks: Vec<Check>,
}

impl Report {
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

/// Scans every floating-point element of `tensors` for NaN and infinity, in
/// parallel, releasing mapped pages as it goes.
fn non_finite(files: &Files, tensors: &[GlobalTensor]) -> Vec<String> {
    tensors
        .par_iter()
        .filter(|t| t.dtype.is_float())
        .filter_map(|t| {
            let bad: u64 = t
                .chunks
                .iter()
                .map(|c| {
                    let r = c.footprint();
                    let bytes = files.slice(r);
                    let n = count_non_finite(t.dtype, bytes);
                    files.get(r.file).release(r.offset, r.len);
                    n
                })
                .sum();
            (bad > 0).then(|| format!("{}: {bad} NaN or infinite values", t.name))
        })
        .collect()
}

/// Counts elements whose exponent bits are all ones (NaN or ±inf).
pub fn count_non_finite(dtype: DType, bytes: &[u8]) -> u64 {
    fn count<const N: usize>(bytes: &[u8], f: impl Fn([u8; N]) -> bool) -> u64 {
        bytes
            .chunks_exact(N)
            .filter(|c| f((*c).try_into().expect("N bytes")))
            .count() as u64
    }
    match dtype {
        DType::BF16 => count::<2>(bytes, |b| u16::from_le_bytes(b) & 0x7f80 == 0x7f80),
        DType::F16 => count::<2>(bytes, |b| u16::from_le_bytes(b) & 0x7c00 == 0x7c00),
        DType::F32 => count::<4>(bytes, |b| {
            u32::from_le_bytes(b) & 0x7f80_0000 == 0x7f80_0000
        }),
        DType::F64 => count::<8>(bytes, |b| {
            u64::from_le_bytes(b) & 0x7ff0_0000_0000_0000 == 0x7ff0_0000_0000_0000
        }),
        // e4m3fn has no infinities; its NaN is S.1111.111.
        DType::F8E4M3 => bytes.iter().filter(|&&b| b & 0x7f == 0x7f).count() as u64,
        DType::F8E5M2 => bytes.iter().filter(|&&b| b & 0x7c == 0x7c).count() as u64,
        _ => 0,
    }
}

/// Validates the output directory `dir`, of `kind`. `published` says whether `dir`
/// is in its final place (then a Megatron run directory's tracker is checked too).
pub fn validate(dir: &Path, kind: &str, published: bool) -> Report {
    let started = Instant::now();
    let mut checks = Checks(Vec::new());
    let m = Manifest::read(&dir.join(manifest::FILE_NAME));
    match &m {
        Ok(_) => match manifest::verify(dir) {
            Ok(v) if v.problems.is_empty() => checks.add(
                "manifest",
                Ok(format!("{} files match their sizes and digests", v.files)),
            ),
            Ok(v) => checks.add("manifest", Err(first(&v.problems))),
            Err(e) => checks.add("manifest", Err(e)),
        },
        Err(e) => checks.add("manifest", Err(e.clone())),
    }
    match kind {
        "checkpoint_hf" => validate_hf(dir, m.as_ref().ok(), &mut checks),
        _ => validate_megatron(dir, published, &mut checks),
    }
    let failed = checks.0.iter().filter(|c| !c.passed).count();
    Report {
        v: 1,
        path: dir.to_owned(),
        kind: kind.into(),
        passed: checks.0.len() - failed,
        failed,
        seconds: started.elapsed().as_secs_f64(),
        checks: checks.0,
    }
}

fn validate_hf(dir: &Path, m: Option<&Manifest>, checks: &mut Checks) {
    checks.add(
        "config",
        if dir.join("config.json").is_file() {
            crate::models::read_config(dir)
                .map(|_| "config.json is valid JSON".into())
                .map_err(|e| e.to_string())
        } else {
            Err("config.json is missing: transformers cannot load the directory".into())
        },
    );
    match HfCheckpoint::open(dir) {
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
            let bad = non_finite(&ckpt.files, &ckpt.tensors);
            checks.add(
                "finite",
                if bad.is_empty() {
                    Ok("no NaN or infinite values".into())
                } else {
                    Err(first(&bad))
                },
            );
        }
        Err(e) => checks.add("weights", Err(e.to_string())),
    }
    if let Some(m) = m {
        let missing: Vec<String> = m
            .provenance
            .side_files
            .iter()
            .filter(|f| !dir.join(&f.path).is_file())
            .map(|f| format!("{} ({}) is missing", f.path, f.kind))
            .collect();
        checks.add(
            "tokenizer and config files",
            if missing.is_empty() {
                Ok(format!(
                    "{} side files present",
                    m.provenance.side_files.len()
                ))
            } else {
                Err(first(&missing))
            },
        );
    }
}

fn validate_megatron(dir: &Path, published: bool, checks: &mut Checks) {
    checks.add(
        "metadata.json",
        match std::fs::read_to_string(dir.join("metadata.json")) {
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
    match MegatronCheckpoint::open(dir) {
        Ok(ckpt) => {
            checks.add(
                "items",
                Ok(format!(
                    "{} tensors and {} bytes items, every item inside its .distcp file and consistent with .metadata",
                    ckpt.tensors.len(),
                    ckpt.byte_items.len()
                )),
            );
            let bad = non_finite(&ckpt.files, &ckpt.tensors);
            checks.add(
                "finite",
                if bad.is_empty() {
                    Ok("no NaN or infinite values".into())
                } else {
                    Err(first(&bad))
                },
            );
        }
        Err(e) => checks.add("items", Err(e.to_string())),
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_values_are_counted_per_dtype() {
        let bf16: Vec<u8> = [0x3f80u16, 0x7f80, 0xff80, 0x7fc0, 0x0000]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(count_non_finite(DType::BF16, &bf16), 3);
        let f32s: Vec<u8> = [1.0f32, f32::NAN, f32::NEG_INFINITY, f32::MAX]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(count_non_finite(DType::F32, &f32s), 2);
        assert_eq!(count_non_finite(DType::I64, &[0xff; 16]), 0);
    }
}
