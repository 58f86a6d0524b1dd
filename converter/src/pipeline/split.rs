//! One conversion split across processes: `workers=N part=I`, then `finalize`.
//!
//! The plan fixes every output file and byte offset before data moves, so the
//! files can be shared out without the processes talking to each other. Every
//! part plans exactly as a single run does, takes its share of the output files
//! ([`assign`]: largest first into the least-loaded part, the same on every
//! machine), writes only those into the target's shared staging directory
//! ([`crate::publish::SharedStaging`]), fsyncs them, and then writes its
//! completion record `.ckpt-split/part-I-of-N.json` atomically: the plan's
//! [`fingerprint`], its files with sizes and digests, the per-piece and
//! per-source-chunk digest lines that the manifest's digests are computed from,
//! and what validation reads: each piece's bytes read back from its file once
//! durable (digest and count of NaN and infinite values; a piece that reads back
//! other than written fails the part, so only that part is run again).
//!
//! The final step plans again, checks every record against that plan
//! ([`Finalize::check`]), writes what a single run writes outside the tensor
//! files (config, tokenizer, metadata), the manifest and the validation report,
//! validates, and publishes by the usual rename. Its validation takes the parts'
//! read-back ([`Finalize::known`]) where its reader finds a tensor at the place a
//! part read, so the output's bytes are read back once, split as they were
//! written, while the checks of structure and the smoke test run once. Until
//! then the output is a staging directory, which never looks complete. A part
//! run again replaces its own files and record, or does nothing when its record
//! already matches (the plan, and the digest of every file it lists).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use ckpt_wire::Step;
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::{Xxh3, xxh3_128};

use crate::execute::{self, FileRecord, Outcome, Progress};
use crate::pipeline::error::Error;
use crate::pipeline::preflight::PreflightError;
use crate::pipeline::{Report, RunOptions, SourceInfo, Target};
use crate::plan::{Dest, Plan, TensorStore};
use crate::publish::{SharedStaging, Staging};

/// The parameters of a split run that are not the conversion's own.
pub const PARAMS: [&str; 3] = ["workers", "part", "finalize"];

/// The directory of the completion records inside the shared staging directory;
/// removed just before the output is published.
pub const RECORDS: &str = ".ckpt-split";

const RECORD_FORMAT: &str = "ckpt-split-part";
const RECORD_VERSION: u32 = 2;

/// A split run as asked for: `workers=N` with `part=I` or `finalize=true`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    /// `workers`, when given.
    pub workers: Option<u64>,
    /// `part`, when given.
    pub part: Option<u64>,
    /// `finalize`.
    pub finalize: bool,
}

/// What this process does in a split run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Writes part `part` of `workers`.
    Part {
        /// The part, below `workers`.
        part: usize,
        /// The number of parts.
        workers: usize,
    },
    /// Checks the parts' records and publishes.
    Finalize {
        /// The number of parts.
        workers: usize,
    },
}

impl Split {
    /// `None` for an ordinary run; otherwise what this process does.
    ///
    /// # Errors
    /// [`PreflightError::BadValue`] for a part outside `0..workers`, `part` with
    /// `finalize`, or either without `workers` (and `workers` without either).
    pub fn role(&self) -> Result<Option<Role>, PreflightError> {
        let bad = |name: &str, value: String, expected: String| PreflightError::BadValue {
            name: name.into(),
            value,
            expected,
        };
        let Some(workers) = self.workers else {
            if let Some(part) = self.part {
                return Err(bad(
                    "part",
                    part.to_string(),
                    "workers=N beside it (the number of parts)".into(),
                ));
            }
            if self.finalize {
                return Err(bad(
                    "finalize",
                    "true".into(),
                    "workers=N beside it (the number of parts to check)".into(),
                ));
            }
            return Ok(None);
        };
        let workers = usize::try_from(workers).unwrap_or(usize::MAX);
        match (self.part, self.finalize) {
            (Some(part), true) => Err(bad(
                "part",
                part.to_string(),
                "part=I or finalize=true, not both (finalize runs after every part)".into(),
            )),
            (Some(part), false) if part >= workers as u64 => Err(bad(
                "part",
                part.to_string(),
                format!("an integer from 0 to {} (workers={workers})", workers - 1),
            )),
            (Some(part), false) => Ok(Some(Role::Part {
                part: part as usize,
                workers,
            })),
            (None, true) => Ok(Some(Role::Finalize { workers })),
            (None, false) => Err(bad(
                "workers",
                workers.to_string(),
                "part=I (write one part) or finalize=true (publish the parts) beside it".into(),
            )),
        }
    }
}

/// Why a split run's final step refused or failed; nothing is published.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SplitError {
    /// A part has not finished (exit 1: run it, then finalize again).
    #[error("{}: part {part} of {workers} has no completion record: expected every part done before finalize (run it with workers={workers} part={part})", path.display())]
    MissingPart {
        /// The record expected.
        path: PathBuf,
        /// The part.
        part: usize,
        /// The number of parts.
        workers: usize,
    },
    /// A part was run with another plan (exit 2: run it again with this one's
    /// parameters).
    #[error("{}: part {part} was written for another plan: expected fingerprint {expected}, found {found} (run the part again with the same parameters as finalize)", path.display())]
    OtherPlan {
        /// The record.
        path: PathBuf,
        /// The part.
        part: usize,
        /// This plan's fingerprint.
        expected: String,
        /// The record's.
        found: String,
    },
    /// A record or a file does not match what the plan gives the part (exit 1:
    /// run the part again).
    #[error("{}: part {part}: expected {expected}, found {found} (run the part again)", path.display())]
    Mismatch {
        /// The record or file.
        path: PathBuf,
        /// The part.
        part: usize,
        /// What the plan and record say.
        expected: String,
        /// What is there.
        found: String,
    },
}

/// A part's completion record (`.ckpt-split/part-I-of-N.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    /// Always `ckpt-split-part`.
    format: String,
    /// [`RECORD_VERSION`].
    version: u32,
    /// The plan's [`fingerprint`].
    fingerprint: String,
    part: usize,
    workers: usize,
    /// The part's files, sorted by path, with size and digest.
    files: Vec<FileRecord>,
    /// The digest lines of the part's pieces ([`Outcome::piece_lines`]).
    pieces: Vec<String>,
    /// The digest lines of the source chunks it read ([`Outcome::source_lines`]).
    source_chunks: Vec<(usize, String)>,
    /// The most bytes of pieces it had in flight.
    peak_in_flight: u64,
    /// Each piece's data as read back once durable, by piece name: its
    /// XXH3-128 and count of NaN and infinite values.
    read_back: BTreeMap<String, (String, u64)>,
    /// Each file's modification and change times (seconds and nanoseconds of
    /// each) once read back: the final step, which does not read the bytes
    /// again, knows by them that a file is the one the part read.
    stamps: BTreeMap<String, [i64; 4]>,
    /// For a merge, what the probe found for each merged piece as it was
    /// written ([`crate::smoke::probe::Probe`]).
    probed: Vec<crate::smoke::probe::ProbedPiece>,
}

/// A file's modification and change times (a write changes both; only the
/// kernel sets the change time). The same on every client of a shared
/// filesystem, unlike its device number.
fn stamp(m: &std::fs::Metadata) -> [i64; 4] {
    use std::os::unix::fs::MetadataExt;
    [m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec()]
}

fn record_path(staging: &Path, part: usize, workers: usize) -> PathBuf {
    staging
        .join(RECORDS)
        .join(format!("part-{part}-of-{workers}.json"))
}

/// The part (below `workers`) of each of the plan's files: largest first into
/// the part with the fewest bytes so far, ties by file and by part index. The
/// same plan gives the same assignment everywhere.
pub fn assign(plan: &Plan, workers: usize) -> Vec<usize> {
    let workers = workers.max(1);
    let mut order: Vec<usize> = (0..plan.files.len()).collect();
    order.sort_by(|&a, &b| plan.files[b].len.cmp(&plan.files[a].len).then(a.cmp(&b)));
    let mut load = vec![0u64; workers];
    let mut part_of = vec![0; plan.files.len()];
    for f in order {
        let least = (0..workers)
            .min_by_key(|&p| (load[p], p))
            .expect("at least one part");
        load[least] += plan.files[f].len;
        part_of[f] = least;
    }
    part_of
}

/// Feeds formatted text into a digest without building the string.
struct Hasher(Xxh3);

impl std::fmt::Write for Hasher {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.update(s.as_bytes());
        Ok(())
    }
}

/// A digest of everything that defines the output: the step, the parameters
/// that change what is written, the sources' identities, and the plan (every
/// file with its length and fixed bytes, every piece with its inputs, dtype,
/// shape, transform and destination offset, the generated and copied files).
///
/// Where a process sees its sources is not part of it: the sources are known by
/// their content (files, sizes, header and side-file digests), and the parts and
/// the final step may see one checkpoint under different mount points (a pod's
/// volume, a Slurm node's mount). Nor are the bytes of the files the final step
/// generates or copies itself, which may name those paths.
pub fn fingerprint(
    step: Step,
    parameters: &BTreeMap<String, String>,
    plan: &Plan,
    sources: &[SourceInfo],
) -> String {
    let mut h = Hasher(Xxh3::new());
    let defines = |k: &str| {
        step.params().iter().any(|p| {
            (p.name == k || p.alias == Some(k))
                && p.defines_output()
                && p.role != ckpt_wire::Role::Input
        })
    };
    let _ = writeln!(h, "step {}", step.name());
    for (k, v) in parameters.iter().filter(|(k, _)| defines(k)) {
        let _ = writeln!(h, "param {k}={v}");
    }
    for s in sources {
        let _ = writeln!(h, "source {} {}", s.role, s.kind);
        for f in &s.files {
            let _ = writeln!(h, "  {} {} {:?}", f.path, f.size, f.header_xxh3);
        }
    }
    for f in &plan.files {
        let _ = write!(h, "file {} {}", f.rel, f.len);
        for (at, bytes) in &f.fixed {
            let _ = write!(h, " {at}:{:032x}", xxh3_128(bytes));
        }
        let _ = writeln!(h);
    }
    // Piece order is not part of the output; their content is.
    let mut pieces: Vec<u128> = plan
        .pieces
        .iter()
        .map(|p| {
            let mut ph = Hasher(Xxh3::new());
            let _ = write!(ph, "{p:?}");
            ph.0.digest128()
        })
        .collect();
    pieces.sort_unstable();
    for p in pieces {
        let _ = writeln!(h, "piece {p:032x}");
    }
    // The final step writes these itself, so the parts need agree only on their
    // names (their bytes may name where the final step sees its sources).
    for g in &plan.generated {
        let _ = writeln!(h, "generated {}", g.rel);
    }
    for c in &plan.copied {
        let _ = writeln!(h, "copied {} {}", c.rel, c.kind);
    }
    crate::formats::digest::format_digest(h.0.digest128())
}

/// The parameters without the split's own, as the manifest records them (a
/// split run's output is the single run's).
pub fn conversion_parameters(parameters: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    parameters
        .iter()
        .filter(|(k, _)| !PARAMS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The plan restricted to the files of `mine` (indices into `plan.files`), with
/// their pieces; nothing generated or copied.
fn part_plan(plan: &Plan, mine: &[usize]) -> Plan {
    let index: BTreeMap<usize, usize> = mine.iter().enumerate().map(|(i, &f)| (f, i)).collect();
    let pieces = plan
        .pieces
        .iter()
        .filter_map(|p| {
            let (Dest::Raw { file, .. } | Dest::DcpItem { file, .. }) = &p.dest;
            let new = *index.get(file)?;
            let mut p = p.clone();
            match &mut p.dest {
                Dest::Raw { file, .. } | Dest::DcpItem { file, .. } => *file = new,
            }
            Some(p)
        })
        .collect();
    Plan {
        files: mine.iter().map(|&f| plan.files[f].clone()).collect(),
        pieces,
        generated: Vec::new(),
        copied: Vec::new(),
        skipped: Vec::new(),
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| {
        crate::publish::PublishError::Io {
            path: path.to_owned(),
            source,
        }
        .into()
    }
}

/// Removes `path` if it is there.
fn remove(path: &Path) -> Result<(), Error> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Reads the record of `part`: `Ok(None)` when there is none.
fn read_record(path: &Path, part: usize) -> Result<Option<Record>, Error> {
    let bytes = match crate::formats::file::read_opt(path, crate::formats::file::limit::INDEX) {
        Ok(Some(b)) => b,
        Ok(None) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let record: Record = serde_json::from_slice(&bytes).map_err(|e| SplitError::Mismatch {
        path: path.to_owned(),
        part,
        expected: format!(
            "a completion record (JSON, format {RECORD_FORMAT} version {RECORD_VERSION})"
        ),
        found: e.to_string(),
    })?;
    if record.format != RECORD_FORMAT || record.version != RECORD_VERSION {
        return Err(SplitError::Mismatch {
            path: path.to_owned(),
            part,
            expected: format!("format {RECORD_FORMAT} version {RECORD_VERSION}"),
            found: format!("format {} version {}", record.format, record.version),
        }
        .into());
    }
    Ok(Some(record))
}

/// Checks a record against the plan: its fingerprint, that it lists exactly
/// the part's planned files at their planned sizes, one digest line per
/// planned piece, and that each file is in `staging` at its recorded size.
fn check_record(
    record: &Record,
    path: &Path,
    plan: &Plan,
    fingerprint: &str,
    mine: &[usize],
    staging: &Path,
) -> Result<(), Error> {
    let part = record.part;
    let mismatch = |path: &Path, expected: String, found: String| -> Error {
        SplitError::Mismatch {
            path: path.to_owned(),
            part,
            expected,
            found,
        }
        .into()
    };
    if record.fingerprint != fingerprint {
        return Err(SplitError::OtherPlan {
            path: path.to_owned(),
            part,
            expected: fingerprint.into(),
            found: record.fingerprint.clone(),
        }
        .into());
    }
    let planned: BTreeMap<&str, u64> = mine
        .iter()
        .map(|&f| (plan.files[f].rel.as_str(), plan.files[f].len))
        .collect();
    let recorded: BTreeMap<&str, u64> = record
        .files
        .iter()
        .map(|f| (f.path.as_str(), f.size))
        .collect();
    if planned != recorded {
        return Err(mismatch(
            path,
            format!("files {planned:?}"),
            format!("{recorded:?}"),
        ));
    }
    let sub = part_plan(plan, mine);
    if record.pieces.len() != sub.pieces.len() {
        return Err(mismatch(
            path,
            format!("{} piece digests", sub.pieces.len()),
            record.pieces.len().to_string(),
        ));
    }
    if let Some(p) = sub
        .pieces
        .iter()
        .find(|p| !record.read_back.contains_key(&p.name))
    {
        return Err(mismatch(
            path,
            format!("the read-back digest of every piece, {} among them", p.name),
            format!("{} read-back digests without it", record.read_back.len()),
        ));
    }
    for f in &record.files {
        let file = staging.join(&f.path);
        match std::fs::symlink_metadata(&file) {
            Ok(m) if m.is_file() && m.len() == f.size => {
                if record.stamps.get(&f.path) != Some(&stamp(&m)) {
                    return Err(mismatch(
                        &file,
                        "the file as the part read it back (its modification and change times)"
                            .into(),
                        "it changed since".into(),
                    ));
                }
            }
            Ok(m) => {
                return Err(mismatch(
                    &file,
                    format!("a file of {} bytes", f.size),
                    format!("{} bytes", m.len()),
                ));
            }
            Err(e) => {
                return Err(mismatch(
                    &file,
                    format!("a file of {} bytes", f.size),
                    e.to_string(),
                ));
            }
        }
    }
    Ok(())
}

/// A piece's data as read back: its XXH3-128 (hex) and count of NaN and
/// infinite values.
type ReadBack = (String, u64);

/// Reads back the files of `plan` (a part's) under `dir` once durable, each
/// once: the file whole, and each piece's data in it (its digest and count of
/// NaN and infinite values, returned by name).
///
/// # Errors
/// [`SplitError::Mismatch`] naming the file, and the piece, whose bytes read back
/// differ from those written (`outcome`: this part's execution).
fn read_back(
    plan: &Plan,
    dir: &Path,
    part: usize,
    outcome: &Outcome,
) -> Result<BTreeMap<String, ReadBack>, Error> {
    use rayon::prelude::*;
    // A written line is `name|dtype|shape|digest`.
    let written: BTreeMap<&str, &str> = outcome
        .piece_lines
        .iter()
        .filter_map(|l| l.trim_end().rsplit_once('|'))
        .collect();
    let in_file = execute::pieces_by_file(plan, plan.files.len());
    let per_file = plan
        .files
        .par_iter()
        .zip(&in_file)
        .map(
            |(f, (pieces, ranges))| -> Result<Vec<(String, ReadBack)>, Error> {
                let path = dir.join(&f.rel);
                let (size, digest, read) = crate::formats::digest::file_and_ranges(&path, ranges)
                    .map_err(io_err(&path))?;
                let mismatch = |expected: String, found: String| -> Error {
                    SplitError::Mismatch {
                        path: path.clone(),
                        part,
                        expected,
                        found,
                    }
                    .into()
                };
                let mut found = Vec::with_capacity(pieces.len());
                for ((p, (h, bad)), &(offset, ..)) in pieces.iter().zip(read).zip(ranges) {
                    let h = crate::formats::digest::format_digest(h);
                    let key = format!("{}|{}|{:?}", p.name, p.dtype, p.shape);
                    match written.get(key.as_str()) {
                        Some(w) if *w == h => found.push((p.name.clone(), (h, bad))),
                        w => {
                            return Err(mismatch(
                                format!(
                                    "{}'s bytes at {offset}..{} as written (xxh3 {})",
                                    p.name,
                                    offset + p.nbytes(),
                                    w.unwrap_or(&"not recorded")
                                ),
                                format!("xxh3 {h} read back"),
                            ));
                        }
                    }
                }
                // The bytes around the pieces (headers, archives) too.
                match outcome.files.iter().find(|w| w.path == f.rel) {
                    Some(w) if w.size == size && w.xxh3 == digest => Ok(found),
                    w => Err(mismatch(
                        match w {
                            Some(w) => {
                                format!("the file as written ({} bytes, xxh3 {})", w.size, w.xxh3)
                            }
                            None => "a file this part wrote".into(),
                        },
                        format!("{size} bytes, xxh3 {digest} read back"),
                    )),
                }
            },
        )
        .collect::<Result<Vec<_>, Error>>()?;
    Ok(per_file.into_iter().flatten().collect())
}

/// Writes part `part` of `workers` of the plan into the shared staging
/// directory of the target, then its completion record. Nothing is published.
///
/// # Errors
/// [`Error`] from execution or the staging directory; the part's record is
/// then absent, so finalize refuses until it is run again.
#[allow(clippy::too_many_arguments)]
pub fn run_part(
    step: Step,
    plan: &Plan,
    stores: &[&dyn TensorStore],
    fingerprint: &str,
    target: &Target,
    (part, workers): (usize, usize),
    opts: &RunOptions,
    progress: &dyn Progress,
    mut warnings: Vec<String>,
) -> Result<Report, Error> {
    let started = std::time::Instant::now();
    let assignment = assign(plan, workers);
    let mine: Vec<usize> = (0..plan.files.len())
        .filter(|&f| assignment[f] == part)
        .collect();
    let staging = SharedStaging::open(&target.dir)?;
    let record_at = record_path(staging.path(), part, workers);
    // Done when the record matches and every file still has its digest.
    let done = match read_record(&record_at, part) {
        Ok(Some(r)) => {
            r.part == part
                && r.workers == workers
                && check_record(&r, &record_at, plan, fingerprint, &mine, staging.path()).is_ok()
                && r.files.iter().all(|f| {
                    crate::formats::digest::file(&staging.path().join(&f.path))
                        .is_ok_and(|(size, digest)| size == f.size && digest == f.xxh3)
                })
        }
        Ok(None) | Err(_) => false,
    };
    let sub = part_plan(plan, &mine);
    let peak = if done {
        progress.finish();
        warnings.push(format!(
            "part {part} of {workers} was already written for this plan; nothing rewritten"
        ));
        0
    } else {
        // A run again replaces this part's files and record, and nothing else.
        remove(&record_at)?;
        for f in &sub.files {
            remove(&staging.path().join(&f.rel))?;
        }
        // A merge's pieces are probed as they are written, whatever finalize
        // will ask for: only the bytes in hand are cheap to probe.
        let probe = sub
            .pieces
            .iter()
            .any(|p| p.merge.is_some())
            .then(|| crate::smoke::probe::Probe::new(stores));
        let observer: &dyn execute::Observer = match &probe {
            Some(p) => p,
            None => &execute::Unobserved,
        };
        let pool = opts.exec.pool(execute::WORKERS)?;
        let (outcome, ()) = pool.install(|| {
            execute::execute_with(
                &sub,
                stores,
                staging.path(),
                &opts.exec,
                progress,
                observer,
                |_| (),
            )
        })?;
        // A source that moved while we read it makes the part untrustworthy.
        for store in stores {
            store.files().check_unchanged()?;
        }
        crate::failpoint::hit("read-back");
        let read_back = pool.install(|| read_back(&sub, staging.path(), part, &outcome))?;
        let stamps = sub
            .files
            .iter()
            .map(|f| {
                let path = staging.path().join(&f.rel);
                std::fs::symlink_metadata(&path)
                    .map(|m| (f.rel.clone(), stamp(&m)))
                    .map_err(io_err(&path))
            })
            .collect::<Result<_, _>>()?;
        let record = Record {
            format: RECORD_FORMAT.into(),
            version: RECORD_VERSION,
            fingerprint: fingerprint.into(),
            part,
            workers,
            files: outcome.files,
            pieces: outcome.piece_lines,
            source_chunks: outcome.source_lines,
            peak_in_flight: outcome.peak_in_flight,
            read_back,
            stamps,
            probed: probe.map(|p| p.take()).unwrap_or_default(),
        };
        let dir = staging.path().join(RECORDS);
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let mut text = serde_json::to_string_pretty(&record).expect("record serializes");
        text.push('\n');
        crate::publish::write_atomic(&record_at, text.as_bytes())?;
        progress.finish();
        record.peak_in_flight
    };
    warnings.push(format!(
        "part {part} of {workers} is in {} ({} files); publish with workers={workers} finalize=true once every part is done",
        staging.path().display(),
        sub.files.len()
    ));
    if plan.files.len() < workers {
        warnings.push(format!(
            "the output has {} tensor files to share out among {workers} parts, so {} parts have nothing to write: give distcp_files={workers} (Megatron output), or mirror_shards=false and a max_shard_size that makes at least {workers} shards (HF output), to every part and to finalize",
            plan.files.len(),
            workers - plan.files.len()
        ));
    }
    let seconds = started.elapsed().as_secs_f64();
    let tensor_bytes = sub.tensor_bytes();
    Ok(Report {
        step: step.name().into(),
        status: "staged".into(),
        output: target.dir.clone(),
        kind: target.kind,
        tensors: sub.pieces.len(),
        tensor_bytes,
        files: sub.files.len(),
        seconds,
        bytes_per_second: tensor_bytes as f64 / seconds.max(1e-9),
        peak_in_flight_bytes: peak,
        weights_digest: String::new(),
        manifest: None,
        validation: None,
        plan: Vec::new(),
        skipped: Vec::new(),
        warnings,
        reused: false,
        other_outputs: Vec::new(),
    })
}

/// The parts' records, checked against the plan: what the final step builds
/// the manifest from.
pub struct Finalize {
    records: Vec<Record>,
}

impl Finalize {
    /// Checks that every part's record exists and matches the plan, and that
    /// every planned file is in the shared staging directory at its recorded size.
    ///
    /// # Errors
    /// [`SplitError`] naming the first part that is missing or does not match.
    pub fn check(
        plan: &Plan,
        fingerprint: &str,
        target: &Path,
        workers: usize,
    ) -> Result<Finalize, Error> {
        let staging = crate::publish::shared_staging_dir(target);
        let assignment = assign(plan, workers);
        let mut records = Vec::with_capacity(workers);
        for part in 0..workers {
            let path = record_path(&staging, part, workers);
            let Some(record) = read_record(&path, part)? else {
                return Err(SplitError::MissingPart {
                    path,
                    part,
                    workers,
                }
                .into());
            };
            if record.part != part || record.workers != workers {
                return Err(SplitError::Mismatch {
                    path,
                    part,
                    expected: format!("part {part} of {workers}"),
                    found: format!("part {} of {}", record.part, record.workers),
                }
                .into());
            }
            if record.fingerprint != fingerprint {
                return Err(SplitError::OtherPlan {
                    path,
                    part,
                    expected: fingerprint.into(),
                    found: record.fingerprint,
                }
                .into());
            }
            records.push((path, record));
        }
        // Files only once every part is known to be of this plan: a part of
        // another plan may have written over a file of this one.
        for (part, (path, record)) in records.iter().enumerate() {
            let mine: Vec<usize> = (0..plan.files.len())
                .filter(|&f| assignment[f] == part)
                .collect();
            check_record(record, path, plan, fingerprint, &mine, &staging)?;
        }
        Ok(Finalize {
            records: records.into_iter().map(|(_, r)| r).collect(),
        })
    }

    /// Hands the probe what the parts' probes found as they wrote their merged
    /// pieces.
    pub fn feed(&self, probe: &crate::smoke::probe::Probe<'_>) {
        for r in &self.records {
            probe.add(&r.probed);
        }
    }

    /// Takes over the shared staging directory, removing what an earlier final
    /// step may have written there (it is written again).
    ///
    /// # Errors
    /// [`crate::publish::PublishError::PartRunning`] while a part still runs.
    pub fn adopt(&self, plan: &Plan, target: &Path) -> Result<Staging, Error> {
        let staging = Staging::adopt_shared(target)?;
        let rels = plan.generated.iter().map(|g| g.rel.as_str());
        let rels = rels.chain(plan.copied.iter().map(|c| c.rel.as_str()));
        let ours = [
            crate::formats::manifest::FILE_NAME,
            crate::validate::FILE_NAME,
        ];
        for rel in rels.chain(ours) {
            remove(&staging.path().join(rel))?;
        }
        Ok(staging)
    }

    /// What the final step itself writes: the plan's generated and copied files.
    pub fn side_plan(plan: &Plan) -> Plan {
        Plan {
            files: Vec::new(),
            pieces: Vec::new(),
            generated: plan.generated.clone(),
            copied: plan.copied.clone(),
            skipped: plan.skipped.clone(),
        }
    }

    /// The outcome of the whole plan: the side files' (`side`) and every
    /// part's, as one execution of the whole plan would have reported it.
    pub fn outcome(&self, side: &Outcome, plan: &Plan, stores: usize) -> Outcome {
        let mut files = side.files.clone();
        let mut piece_lines = side.piece_lines.clone();
        // A source chunk two parts read is one chunk of the source.
        let mut source_lines: BTreeSet<(usize, String)> =
            side.source_lines.iter().cloned().collect();
        let mut peak = side.peak_in_flight;
        let mut read_back = side.read_back.clone();
        for r in &self.records {
            read_back.extend(r.read_back.iter().filter_map(|(name, (digest, bad))| {
                Some((name.clone(), (u128::from_str_radix(digest, 16).ok()?, *bad)))
            }));
            files.extend(r.files.iter().cloned());
            piece_lines.extend(r.pieces.iter().cloned());
            source_lines.extend(r.source_chunks.iter().cloned());
            peak = peak.max(r.peak_in_flight);
        }
        files.sort_by(|a, b| a.path.cmp(&b.path));
        let source_lines: Vec<(usize, String)> = source_lines.into_iter().collect();
        Outcome {
            files,
            weights_digest: crate::formats::digest::of_lines(piece_lines.clone()),
            piece_lines,
            source_digests: execute::store_digests(stores, &source_lines),
            source_lines,
            source_chunks: side.source_chunks.clone(),
            pieces: plan.pieces.len(),
            tensor_bytes: plan.tensor_bytes(),
            peak_in_flight: peak,
            read_back,
        }
    }

    /// Removes the completion records, and the temporary marker of a part killed
    /// while it made the directory, just before the output is published.
    ///
    /// # Errors
    /// [`Error::Publish`] when they cannot be removed.
    pub fn clear(staging: &Path) -> Result<(), Error> {
        let dir = staging.join(RECORDS);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&dir)(e)),
        }
        let tmp = format!("{}.tmp-", crate::publish::MARKER);
        for entry in std::fs::read_dir(staging).map_err(io_err(staging))? {
            let entry = entry.map_err(io_err(staging))?;
            if entry.file_name().to_string_lossy().starts_with(&tmp) {
                remove(&entry.path())?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::OutFile;

    fn plan(lens: &[u64]) -> Plan {
        Plan {
            files: lens
                .iter()
                .enumerate()
                .map(|(i, &len)| OutFile {
                    rel: format!("f{i}"),
                    len,
                    fixed: Vec::new(),
                })
                .collect(),
            ..Plan::default()
        }
    }

    #[test]
    fn files_go_largest_first_to_the_least_loaded_part() {
        let p = plan(&[5, 9, 5, 1, 7]);
        // 9 → 0, 7 → 1, 5 (f0) → 2, 5 (f2) → 2 (5 < 7 < 9), 1 → 1 (7 < 9 < 10).
        assert_eq!(assign(&p, 3), vec![2, 0, 2, 1, 1]);
        assert_eq!(assign(&p, 1), vec![0; 5]);
        // More parts than files: the extra parts get nothing.
        assert_eq!(assign(&p, 7), vec![2, 0, 3, 4, 1]);
    }

    #[test]
    fn roles() {
        let s = |workers, part, finalize| Split {
            workers,
            part,
            finalize,
        };
        assert_eq!(s(None, None, false).role().unwrap(), None);
        assert_eq!(
            s(Some(3), Some(2), false).role().unwrap(),
            Some(Role::Part {
                part: 2,
                workers: 3
            })
        );
        assert_eq!(
            s(Some(3), None, true).role().unwrap(),
            Some(Role::Finalize { workers: 3 })
        );
        for bad in [
            s(Some(3), Some(3), false),
            s(Some(3), Some(0), true),
            s(Some(3), None, false),
            s(None, Some(0), false),
            s(None, None, true),
        ] {
            assert!(bad.role().is_err(), "{bad:?}");
        }
    }
}
