//! `ckpt-convert demo`: the main job on a built-in default. Writes a small
//! deterministic Llama checkpoint, converts it HF → Megatron → HF, checks that
//! every tensor came back bit-identical and that both outputs match their
//! manifests, and reports.

use ckpt_wire::Step;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use ckpt_convert::formats::hf::HfCheckpoint;
use ckpt_convert::formats::manifest::{self, Verification};
use ckpt_convert::pipeline::Report;
use ckpt_convert::synthetic::{self, ModelShape};
use serde::Serialize;

/// What the demo did.
#[derive(Debug, Serialize)]
pub struct DemoReport {
    /// The working directory.
    pub dir: PathBuf,
    /// The synthetic source.
    pub source: PathBuf,
    /// HF → Megatron.
    pub to_megatron: Report,
    /// Megatron → HF.
    pub to_hf: Report,
    /// Tensors compared between the source and the round trip.
    pub tensors_compared: usize,
    /// Tensors that differ (empty on success).
    pub mismatches: Vec<String>,
    /// Manifest checks of both outputs.
    pub manifests: [Verification; 2],
    /// Total time.
    pub seconds: f64,
}

fn words(pairs: &[(&str, &Path)]) -> Vec<String> {
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={}", v.display()))
        .collect()
}

/// Runs the demo in `dir` (a fresh temp directory when `None`).
pub fn run(dir: Option<PathBuf>) -> Result<DemoReport> {
    let started = Instant::now();
    let dir = match dir {
        Some(d) => {
            if d.exists() && std::fs::read_dir(&d)?.next().is_some() {
                bail!("--dir {}: expected an empty or new directory", d.display());
            }
            std::fs::create_dir_all(&d)?;
            d
        }
        None => {
            let d = std::env::temp_dir().join(format!("ckpt-demo-{}", std::process::id()));
            if d.exists() {
                std::fs::remove_dir_all(&d)?;
            }
            std::fs::create_dir_all(&d)?;
            d
        }
    };
    let source = dir.join("hf-source");
    let mut shape = ModelShape::tiny_llama();
    shape.layers = 4;
    // Small shards so the sharded layout and its index are exercised.
    synthetic::write_hf(&source, &shape, 7, 200_000).context("writing the demo checkpoint")?;
    let run_dir = dir.join("megatron");
    let (to_megatron, _) = super::run_step(
        Step::HfToMegatron.name(),
        &words(&[("hf_model_id", &source), ("megatron_path", &run_dir)]),
    )?;
    let roundtrip = dir.join("hf-roundtrip");
    let (to_hf, _) = super::run_step(
        Step::MegatronToHf.name(),
        &words(&[
            ("megatron_path", &to_megatron.output),
            ("hf_model_id", &source),
            ("hf_path", &roundtrip),
        ]),
    )?;
    let a = HfCheckpoint::open(&source)?;
    let b = HfCheckpoint::open(&roundtrip)?;
    let mut mismatches = Vec::new();
    for t in &a.tensors {
        match b.tensor(&t.name) {
            None => mismatches.push(format!("{}: missing from the round trip", t.name)),
            Some(u) if u.dtype != t.dtype || u.shape != t.shape => mismatches.push(format!(
                "{}: {} {:?} came back as {} {:?}",
                t.name, t.dtype, t.shape, u.dtype, u.shape
            )),
            Some(u) => {
                let x = a.files.slice(t.chunks[0].footprint());
                let y = b.files.slice(u.chunks[0].footprint());
                if x != y {
                    mismatches.push(format!("{}: values differ", t.name));
                }
            }
        }
    }
    if b.tensors.len() != a.tensors.len() {
        mismatches.push(format!(
            "round trip has {} tensors, source {}",
            b.tensors.len(),
            a.tensors.len()
        ));
    }
    let manifests = [
        manifest::verify(&to_megatron.output).map_err(anyhow::Error::msg)?,
        manifest::verify(&to_hf.output).map_err(anyhow::Error::msg)?,
    ];
    Ok(DemoReport {
        dir,
        source,
        to_megatron,
        to_hf,
        tensors_compared: a.tensors.len(),
        mismatches,
        manifests,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// True when the demo found nothing wrong.
pub fn passed(r: &DemoReport) -> bool {
    r.mismatches.is_empty() && r.manifests.iter().all(|m| m.problems.is_empty())
}

/// Prints the demo report for people.
pub fn print(r: &DemoReport) {
    println!("demo in {}", r.dir.display());
    println!(
        "  source: {} (synthetic Llama, {} tensors)",
        r.source.display(),
        r.tensors_compared
    );
    super::print_report(&r.to_megatron);
    super::print_report(&r.to_hf);
    for (name, m) in [("megatron", &r.manifests[0]), ("hf", &r.manifests[1])] {
        println!(
            "  {name} output matches its manifest: {} ({} files, {})",
            if m.problems.is_empty() { "yes" } else { "NO" },
            m.files,
            super::size(m.bytes)
        );
        for p in &m.problems {
            println!("    {p}");
        }
    }
    if r.mismatches.is_empty() {
        println!(
            "round trip HF → Megatron → HF: all {} tensors bit-identical ({:.1} s)",
            r.tensors_compared, r.seconds
        );
    } else {
        println!(
            "round trip HF → Megatron → HF: {} tensors differ:",
            r.mismatches.len()
        );
        for m in &r.mismatches {
            println!("  {m}");
        }
    }
}
