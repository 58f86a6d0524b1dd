//! The `ckpt-convert` command line: parsing, rendering, and the exit code.

pub mod args;
pub mod config;
pub mod demo;
pub mod help;
pub mod progress;
pub mod remote;

use std::path::PathBuf;

use anyhow::Result;
use ckpt_convert::execute;
use ckpt_convert::inspect::Inspection;
use ckpt_convert::pipeline::preflight::PreflightError;
use ckpt_convert::pipeline::{Report, RunOptions};
use ckpt_convert::steps::{self, Params};
use ckpt_wire::{Step, Summary};
use clap::{Parser, Subcommand};

/// Checkpoint conversion between Hugging Face and Megatron-Core layouts.
#[derive(Debug, Parser)]
#[command(name = "ckpt-convert", version, about, long_about = None)]
pub struct Cli {
    /// Log more (repeat for debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Log lines as JSON.
    #[arg(long, global = true)]
    pub log_json: bool,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a step: `run convert/hf_to_megatron hf_model_id=DIR megatron_path=OUT`.
    ///
    /// The steps and their parameters follow.
    Run {
        /// The step (`convert/hf_to_megatron`, `convert/megatron_to_hf`, `convert/merge_lora`).
        step: String,
        /// Parameters and options.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Show what a checkpoint holds: kind, tensors, shapes, dtypes, sizes, chunking
    /// (for a `.yaml` file such as `run_config.yaml`: the values read from it, as JSON).
    Inspect {
        /// An HF directory, a .safetensors file, a Megatron iter_* or run directory,
        /// or a .yaml file.
        path: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// List every tensor (the default lists the first 40).
        #[arg(long)]
        all: bool,
    },
    /// Check an output: complete, matching its manifest and provenance, the tensors of
    /// its architecture, all values finite; with reference=SOURCE, a forward pass of
    /// fixed tokens through both, logits compared.
    ///
    /// Its parameters (`key=value`, or `--key value`) are those of convert/validate.
    ///
    /// Options: --json prints the report as JSON; --threads N.
    /// Exit code 1 when a check fails. Nothing is ever deleted: a source stays.
    #[command(verbatim_doc_comment)]
    Validate {
        /// An HF directory or a Megatron iter_* (or run) directory.
        path: PathBuf,
        /// Parameters and options.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Remove what interrupted runs left: staging directories whose run is gone
    /// (in PATH, and beside PATH for PATH itself as an output), old outputs an
    /// interrupted --overwrite moved aside (put back, or removed once superseded).
    /// A live run's staging, published outputs and directories without the
    /// converter's marker are never touched. Exit code 1 when something was left
    /// in place (a run still holds it): run it again once nothing does.
    #[command(verbatim_doc_comment)]
    Clean {
        /// Outputs, or directories holding outputs (a run directory, say).
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Where a run submitted with `run … --batch PROFILE` stands; its report once it
    /// finished.
    ///
    /// NAME is what --batch printed: a Slurm job id, or a CheckpointConversion as
    /// NAMESPACE/NAME. Exit code: the run's (0 succeeded, 1 failed, 2 refused), or 3
    /// while it is queued or running.
    #[command(verbatim_doc_comment)]
    Status {
        /// The run: a Slurm job id, or NAMESPACE/NAME of a CheckpointConversion.
        name: String,
        /// The profile it was submitted with (its namespace and mounts, or its
        /// job_dir once Slurm has forgotten the job).
        #[arg(long, short = 'p', visible_alias = "batch", visible_short_alias = 'b')]
        profile: Option<String>,
        /// The profiles file (default: CKPT_ENV_FILE, NEMOTRON_ENV_FILE, ./env.toml).
        #[arg(long)]
        env_file: Option<String>,
        /// Wait until it finishes, with a line whenever its state changes.
        #[arg(long)]
        wait: bool,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The profiles of env.toml (`run STEP --run|--batch PROFILE` runs a step where
    /// one says), or example profiles to start one from.
    Profiles {
        /// The profiles file (default: CKPT_ENV_FILE, NEMOTRON_ENV_FILE, ./env.toml).
        #[arg(long, global = true)]
        env_file: Option<String>,
        /// What to show (default: list the profiles).
        #[command(subcommand)]
        what: Option<ProfilesCommand>,
    },
    /// Write a small Llama checkpoint, convert it HF → Megatron → HF, check it, report.
    Demo {
        /// Where to write (default: a new directory under the system temp dir).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `profiles …`.
#[derive(Debug, Subcommand)]
pub enum ProfilesCommand {
    /// Example profiles: lepton and dgxcloud (Kubernetes), slurm.
    Example {
        /// Only this family.
        family: Option<String>,
    },
    /// One profile as resolved through what it extends.
    Show {
        /// The profile.
        name: String,
    },
}

/// The step named `name`.
///
/// # Errors
/// [`PreflightError::UnknownStep`] listing the steps.
pub fn step_of(name: &str) -> Result<Step, PreflightError> {
    Step::from_name(name).ok_or_else(|| PreflightError::UnknownStep(name.to_owned()))
}

/// Runs a step from raw words; returns the report and whether JSON was asked for.
pub fn run_step(name: &str, words: &[String]) -> Result<(Report, bool)> {
    let raw = args::parse_run(words)?;
    let step = step_of(name)?;
    run_parsed(step, raw)
}

/// Runs `step` here from parsed arguments.
pub fn run_parsed(step: Step, mut raw: args::RunArgs) -> Result<(Report, bool)> {
    if let Some(c) = &raw.config {
        // The command line wins over the file, as a dotlist override does.
        for (k, v) in config::parameters(c)? {
            raw.params.entry(k).or_insert(v);
        }
    }
    let mut exec = execute::Options::default();
    if let Some(n) = raw.threads {
        exec.threads = n;
    }
    if let Some(b) = &raw.memory_budget {
        exec.memory_budget =
            Some(ckpt_convert::formats::hf::parse_size(b).ok_or_else(|| {
                anyhow::anyhow!("--memory-budget={b}: expected a size such as 2GB")
            })?);
    }
    let mut params = Params::new(step, raw.params);
    let opts = RunOptions {
        dry_run: raw.dry_run,
        overwrite: raw.overwrite,
        exec,
        ..RunOptions::default()
    };
    let progress = progress::for_stderr();
    let report = steps::run(step, &mut params, opts, progress.as_ref())?;
    Ok((report, raw.json))
}

/// Human size: `6.43 GB`.
pub fn size(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} kB", b / 1e3)
    } else {
        format!("{bytes} B")
    }
}

/// Prints a report as JSON or for people.
pub fn print_outcome(r: &Report, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
    } else {
        print_report(r);
    }
    Ok(())
}

/// The lines of a remote run's report, from the converter's summary: those of a
/// local run's report ([`print_report`]) that the summary carries.
pub fn summary_lines(s: &Summary) -> Vec<String> {
    let seconds = s.seconds.unwrap_or(0.0);
    let bytes = s.bytes.unwrap_or(0);
    let rate = bytes as f64 / seconds.max(1e-9);
    let mut out = vec![format!(
        "{} {}: {} tensors, {} in {:.1} s ({}/s)",
        s.step,
        s.status,
        s.tensors.unwrap_or(0),
        size(bytes),
        seconds,
        size(rate as u64)
    )];
    if let Some(o) = &s.output {
        out.push(format!(
            "  output:   {o} ({})",
            s.kind.map_or("?", |k| k.as_str())
        ));
    }
    if let Some(m) = &s.manifest {
        out.push(format!("  manifest: {m}"));
    }
    if let Some(d) = &s.weights_digest {
        out.push(format!("  weights digest: {d}"));
    }
    if let (Some(passed), Some(failed)) = (s.checks_passed, s.checks_failed) {
        // A run that succeeded passed its smoke test, when one ran.
        let smoke = match s.smoke_test_max_abs_diff {
            Some(d) => format!("; smoke test passed (max |Δ| {d:.3e})"),
            None => String::new(),
        };
        let report = s
            .report
            .as_deref()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default();
        out.push(format!(
            "  validation: {passed} of {} checks passed{smoke}{report}",
            passed + failed
        ));
    }
    out.extend(s.warnings.iter().map(|w| format!("  warning: {w}")));
    out
}

/// Prints a report for people.
pub fn print_report(r: &Report) {
    for line in report_lines(r) {
        println!("{line}");
    }
}

/// A report for people, line by line.
pub fn report_lines(r: &Report) -> Vec<String> {
    let mut out = Vec::new();
    if r.status == "planned" {
        out.extend(r.plan.iter().cloned());
        out.push(format!(
            "{} planned: {} tensors, {} into {} ({}, {} files); nothing written (dry run)",
            r.step,
            r.tensors,
            size(r.tensor_bytes),
            r.output.display(),
            r.kind,
            r.files
        ));
    } else if r.reused {
        out.push(format!(
            "{} {}: reused, {} already holds this output ({} tensors, {}); nothing rewritten",
            r.step,
            r.status,
            r.output.display(),
            r.tensors,
            size(r.tensor_bytes)
        ));
        out.extend(validation_line("  ", r));
    } else {
        out.push(format!(
            "{} {}: {} tensors, {} in {:.1} s ({}/s)",
            r.step,
            r.status,
            r.tensors,
            size(r.tensor_bytes),
            r.seconds,
            size(r.bytes_per_second as u64)
        ));
        out.push(format!("  output:   {} ({})", r.output.display(), r.kind));
        if let Some(m) = &r.manifest {
            out.push(format!("  manifest: {}", m.display()));
        }
        // A part of a split run has no digest of its own (finalize computes it).
        if !r.weights_digest.is_empty() {
            out.push(format!("  weights digest: {}", r.weights_digest));
        }
        out.extend(validation_line("  ", r));
    }
    for o in &r.other_outputs {
        if o.status == "planned" {
            out.extend(o.plan.iter().cloned());
            out.push(format!(
                "  also planned: {} tensors, {} into {} ({})",
                o.tensors,
                size(o.tensor_bytes),
                o.output.display(),
                o.kind
            ));
        } else {
            out.push(format!(
                "  also written: {} ({})",
                o.output.display(),
                o.kind
            ));
            if let Some(m) = &o.manifest {
                out.push(format!("    manifest: {}", m.display()));
            }
            out.push(format!("    weights digest: {}", o.weights_digest));
            out.extend(validation_line("    ", o));
        }
    }
    out.extend(r.skipped.iter().map(|s| format!("  skipped: {s}")));
    out.extend(r.warnings.iter().map(|w| format!("  warning: {w}")));
    out
}

fn validation_line(indent: &str, r: &Report) -> Option<String> {
    let v = r.validation.as_ref()?;
    let smoke = match (&v.smoke_test, v.smoke_test_max_abs_diff) {
        (Some(s), Some(d)) => format!("; smoke test {s} (max |Δ| {d:.3e})"),
        (Some(s), None) => format!("; smoke test {s}"),
        (None, _) => "; smoke test skipped".into(),
    };
    Some(format!(
        "{indent}validation: {} of {} checks passed{smoke} ({})",
        v.passed,
        v.passed + v.failed,
        v.report.display()
    ))
}

/// Runs `convert/validate` from raw words (`ckpt-convert validate PATH …` passes
/// `path`); returns the report and whether JSON was asked for.
pub fn validate(
    path: Option<&std::path::Path>,
    words: &[String],
) -> Result<(ckpt_convert::validate::Report, bool)> {
    // `--generate` is a switch here; the step takes it as generate=true.
    let words: Vec<String> = words
        .iter()
        .map(|w| {
            if w == "--generate" {
                "generate=true".to_owned()
            } else {
                w.clone()
            }
        })
        .collect();
    let mut raw = args::parse_run(&words)?;
    if raw.dry_run || raw.overwrite || raw.memory_budget.is_some() {
        anyhow::bail!("validate takes no --dry-run, --overwrite or --memory-budget");
    }
    if raw.remote.is_some() {
        anyhow::bail!(
            "validate runs here, over the shared filesystem: it takes no --run or --batch"
        );
    }
    if let Some(n) = raw.threads {
        // The forward pass and the scans use the global pool.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global();
    }
    if let Some(p) = path {
        let p = p.display().to_string();
        if let Some(old) = raw.params.get("path").filter(|old| **old != p) {
            anyhow::bail!("parameter path given twice ({old:?} and {p:?})");
        }
        raw.params.insert("path".into(), p);
    }
    let mut params = Params::new(steps::validate::STEP, raw.params);
    let report = steps::validate::run(&mut params)?;
    Ok((report, raw.json))
}

/// Prints a validation report for people.
pub fn print_validation(r: &ckpt_convert::validate::Report) {
    println!(
        "{} ({}): {} of {} checks passed in {:.1} s",
        r.path.display(),
        r.kind,
        r.passed,
        r.passed + r.failed,
        r.seconds
    );
    for c in &r.checks {
        println!(
            "  {} {}: {}",
            if c.passed { "ok  " } else { "FAIL" },
            c.name,
            c.detail
        );
    }
    if let Some(g) = &r.generation {
        println!(
            "  generate ({} new tokens, {:.1} s, tokenizer {}): {:?} → {:?}",
            g.new_ids.len(),
            g.seconds,
            g.tokenizer.display(),
            g.prompt,
            g.text
        );
    }
}

/// Prints an inspection for people.
pub fn print_inspection(i: &Inspection, all: bool) {
    println!("{}: {}", i.path.display(), i.kind);
    if let Some(note) = &i.note {
        println!("  note: {note}");
    }
    if let Some(a) = &i.architecture {
        println!("  architecture: {a}");
    }
    if let Some(it) = i.iteration {
        println!("  iteration: {it}");
    }
    println!(
        "  {} tensors, {} parameters, {}",
        i.tensors.len(),
        i.total_parameters,
        size(i.total_bytes)
    );
    let limit = if all { usize::MAX } else { 40 };
    for t in i.tensors.iter().take(limit) {
        let chunks = if t.chunks.len() > 1 {
            format!(", {} chunks", t.chunks.len())
        } else {
            String::new()
        };
        println!(
            "  {} {} {:?} {}{} [{}]",
            t.name,
            t.dtype,
            t.shape,
            size(t.bytes),
            chunks,
            t.files.join(", ")
        );
    }
    if i.tensors.len() > limit {
        println!("  … {} more (use --all)", i.tensors.len() - limit);
    }
    if !i.byte_items.is_empty() {
        println!("  {} bytes items (module state), e.g.:", i.byte_items.len());
        for b in i.byte_items.iter().take(5) {
            println!("    {} ({} bytes): {}", b.name, b.bytes, b.payload);
        }
    }
    if i.skipped_keys > 0 {
        println!(
            "  {} optimizer/RNG keys (not model weights)",
            i.skipped_keys
        );
    }
    if let Some(c) = &i.common_state {
        println!("  common state: {c}");
    }
    for (f, kind) in &i.side_files {
        println!(
            "  side file: {f} ({})",
            serde_json::to_value(kind)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default()
        );
    }
    if i.has_manifest {
        println!("  {} present", ckpt_convert::formats::manifest::FILE_NAME);
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use ckpt_convert::pipeline::{ValidationSummary, report};

    use super::*;

    /// A run elsewhere prints the report a local run prints, from the summary the
    /// converter wrote there.
    #[test]
    fn a_remote_report_reads_as_the_local_one() {
        let r = Report {
            step: "convert/megatron_to_hf".into(),
            status: "succeeded".into(),
            output: PathBuf::from("/mnt/lustre-shared/output/convert/sft-hf"),
            kind: ckpt_wire::ArtifactKind::CheckpointHf,
            tensors: 291,
            tensor_bytes: 6_425_673_728,
            files: 9,
            seconds: 12.5,
            bytes_per_second: 6_425_673_728.0 / 12.5,
            peak_in_flight_bytes: 0,
            weights_digest: "0123456789abcdef0123456789abcdef".into(),
            manifest: Some(PathBuf::from(
                "/mnt/lustre-shared/output/convert/sft-hf/ckpt-manifest.json",
            )),
            validation: Some(ValidationSummary {
                passed: 9,
                failed: 0,
                seconds: 1.0,
                report: PathBuf::from(
                    "/mnt/lustre-shared/output/convert/sft-hf/ckpt-validation.json",
                ),
                smoke_test: Some("passed".into()),
                smoke_test_max_abs_diff: Some(3.5e-6),
            }),
            plan: Vec::new(),
            skipped: Vec::new(),
            warnings: vec!["router weights kept in float32".into()],
            reused: false,
            other_outputs: Vec::new(),
        };
        let wire = report::succeeded(&r).to_json();
        let back = Summary::parse(&wire).expect("the summary parses");
        assert_eq!(summary_lines(&back), report_lines(&r));
    }
}
