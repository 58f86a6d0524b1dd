//! Executes a plan: pieces in parallel under a byte budget, positioned writes into
//! pre-laid-out files, then every output fsynced and digested.
//!
//! Memory: a piece holds its inputs (mapped pages, released after use) and, unless
//! it is a plain copy, one output buffer. A budget caps the bytes of pieces in
//! flight; a piece larger than the budget runs alone. So peak memory follows the
//! largest tensors, never the model.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};

use rayon::prelude::*;

use crate::formats::dtype::{DType, cast_into};
pub use crate::formats::manifest::FileRecord;
use crate::formats::source::{GlobalTensor, TensorChunk, read_box};
use crate::formats::{torch_save, torch_zip};
use crate::plan::{Dest, Input, Piece, Plan, TensorStore};
use xxhash_rust::xxh3::{Xxh3, xxh3_128};

/// The chunks of `t` that the box of `input` intersects, with their indices.
fn touched<'a>(
    t: &'a GlobalTensor,
    input: &'a Input,
) -> impl Iterator<Item = (usize, &'a TensorChunk)> + 'a {
    t.chunks.iter().enumerate().filter(move |(_, c)| {
        c.offsets
            .iter()
            .zip(&c.sizes)
            .zip(input.offsets.iter().zip(&input.sizes))
            .all(|((&co, &cs), (&o, &s))| co < o + s && o < co + cs)
    })
}

/// Reports progress; the CLI draws a bar or prints lines, tests ignore it.
pub trait Progress: Sync {
    /// A new phase begins (`convert`, `sync`).
    fn phase(&self, name: &str, total_bytes: u64);
    /// Bytes of the current phase done.
    fn advance(&self, bytes: u64);
    /// All phases are done.
    fn finish(&self);
}

/// Sees each piece's bytes right after they are written, on the worker that
/// produced them, while they are still in cache: a check that costs one pass
/// over data already in hand (the LoRA merge probe) rather than a re-read.
pub trait Observer: Sync {
    /// `bytes` are the piece's output, row-major in its dtype, as written.
    fn written(&self, piece: &Piece, bytes: &[u8]);
}

/// An [`Observer`] that looks at nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct Unobserved;

impl Observer for Unobserved {
    fn written(&self, _: &Piece, _: &[u8]) {}
}

/// A [`Progress`] that reports nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct Silent;

impl Progress for Silent {
    fn phase(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
    fn finish(&self) {}
}

/// Execution settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// Worker threads (1 runs everything on one thread).
    pub threads: usize,
    /// Bytes of pieces in flight; `None` picks 512 MiB or the largest piece's need.
    pub memory_budget: Option<u64>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_budget: None,
        }
    }
}

/// What an execution produced.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Every file written, sorted by path.
    pub files: Vec<FileRecord>,
    /// Digest of the output tensors: XXH3-128 over the sorted lines
    /// `name|dtype|shape|xxh3-128(bytes)` of every piece. It identifies the weights
    /// whatever the file layout.
    pub weights_digest: String,
    /// The same digest over the source chunks read, per store.
    pub source_digests: Vec<String>,
    /// The digest of every source chunk read, for callers that check a source's
    /// identity (in no particular order).
    pub source_chunks: Vec<ChunkDigest>,
    /// The lines [`Outcome::weights_digest`] is the digest of, one per piece
    /// (`name|dtype|shape|xxh3-128`): the parts of a split run record theirs, so
    /// the whole output's digest is computed without reading it again.
    pub piece_lines: Vec<String>,
    /// The lines each of [`Outcome::source_digests`] is the digest of, with
    /// their store (one per source chunk read).
    pub source_lines: Vec<(usize, String)>,
    /// Pieces written.
    pub pieces: usize,
    /// Tensor bytes written.
    pub tensor_bytes: u64,
    /// The most bytes of pieces that were in flight at once.
    pub peak_in_flight: u64,
    /// Each piece's data as read back from its file once every piece was
    /// written (the same read that gives [`Outcome::files`] their digests): its
    /// XXH3-128 and its count of NaN and infinite values, by piece name.
    pub read_back: BTreeMap<String, (u128, u64)>,
}

/// The digest of one source chunk, as read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkDigest {
    /// The store.
    pub store: usize,
    /// The tensor of that store.
    pub tensor: usize,
    /// The chunk of that tensor.
    pub chunk: usize,
    /// XXH3-128 of the chunk's bytes as stored.
    pub xxh3: u128,
}

/// Why execution failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExecuteError {
    /// An output or input file could not be written or read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A source chunk failed its checksum.
    #[error("{}: tensor {tensor:?}: {why}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// What did not match.
        why: String,
    },
    /// A source file was refused or changed while being read.
    #[error(transparent)]
    Source(#[from] crate::formats::FormatError),
    /// The plan is inconsistent (a bug in a mapping).
    #[error("invalid plan: {0}")]
    Plan(String),
    /// A piece's bytes read back from the output differ from those written (a
    /// disk, filesystem or memory fault, or another writer).
    #[error("{}: tensor {tensor:?}: its bytes at {offset}..{end} read back with xxh3 {found}, written with xxh3 {written}", path.display())]
    ReadBack {
        /// The output file.
        path: PathBuf,
        /// The piece (a tensor, or its shard).
        tensor: String,
        /// Where its data starts in the file.
        offset: u64,
        /// Where it ends.
        end: u64,
        /// The digest of the bytes written.
        written: String,
        /// The digest of the bytes read back.
        found: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ExecuteError + '_ {
    move |source| ExecuteError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Checks that every piece reads inside its inputs and fills its output exactly.
///
/// # Errors
/// [`ExecuteError::Plan`] naming the piece.
pub fn check(plan: &Plan, stores: &[&dyn TensorStore]) -> Result<(), ExecuteError> {
    for p in &plan.pieces {
        let bad = |why: String| ExecuteError::Plan(format!("piece {}: {why}", p.name));
        let out_numel: u64 = p.shape.iter().product();
        let row_len = p.gather.row_len.max(1);
        if p.gather.rows() * row_len != out_numel {
            return Err(bad(format!(
                "gathers {} rows of {row_len} for {out_numel} elements",
                p.gather.rows()
            )));
        }
        // A merged piece's inputs are the gathered weight and the adapter's
        // operands; only the former are rows of the output.
        let gathered =
            |i: usize| p.merge.is_none() || p.gather.runs.iter().any(|r| r.input == Some(i));
        let mut metas = Vec::with_capacity(p.inputs.len());
        for (i, input) in p.inputs.iter().enumerate() {
            let store = stores
                .get(input.store)
                .ok_or_else(|| bad("unknown store".into()))?;
            let t = store
                .tensors()
                .get(input.tensor)
                .ok_or_else(|| bad("unknown tensor".into()))?;
            let in_bounds = input.offsets.len() == t.shape.len()
                && input.sizes.len() == t.shape.len()
                && input
                    .offsets
                    .iter()
                    .zip(&input.sizes)
                    .zip(&t.shape)
                    .all(|((o, s), d)| o + s <= *d);
            if !in_bounds {
                return Err(bad(format!(
                    "input {i} box is outside {} {:?}",
                    t.name, t.shape
                )));
            }
            metas.push(crate::plan::merge::InputMeta {
                dtype: t.dtype,
                numel: input.numel(),
            });
            if !gathered(i) {
                continue;
            }
            if input.numel() % row_len != 0 {
                return Err(bad(format!("input {i} is not a whole number of rows")));
            }
            crate::formats::dtype::check_cast(t.dtype, p.dtype).map_err(|e| bad(e.to_string()))?;
        }
        for run in &p.gather.runs {
            if let Some(i) = run.input {
                let input = p
                    .inputs
                    .get(i)
                    .ok_or_else(|| bad(format!("run reads missing input {i}")))?;
                if (run.start + run.rows) * row_len > input.numel() {
                    return Err(bad(format!("run reads past the end of input {i}")));
                }
            }
        }
        if let Some(m) = &p.merge {
            crate::plan::merge::check(m, &p.shape, p.dtype, &metas).map_err(bad)?;
        }
    }
    Ok(())
}

struct Budget {
    limit: u64,
    used: Mutex<u64>,
    peak: AtomicU64,
    freed: Condvar,
}

impl Budget {
    fn acquire(&self, want: u64) -> u64 {
        let n = want.min(self.limit);
        let mut used = self.used.lock().expect("budget lock");
        // A piece larger than the budget waits until it can run alone.
        while *used > 0 && *used + n > self.limit {
            used = self.freed.wait(used).expect("budget lock");
        }
        *used += n;
        self.peak.fetch_max(*used, Ordering::Relaxed);
        n
    }

    fn release(&self, n: u64) {
        *self.used.lock().expect("budget lock") -= n;
        self.freed.notify_all();
    }
}

/// Per-chunk source digests (xxh3-128, fast enough to stay off the critical
/// path), each chunk hashed (and CRC-checked) once.
struct SourceDigests {
    claimed: Vec<Vec<Vec<AtomicBool>>>,
    digests: Mutex<Vec<(usize, String)>>,
    chunks: Mutex<Vec<ChunkDigest>>,
}

impl SourceDigests {
    fn new(stores: &[&dyn TensorStore]) -> Self {
        let claimed = stores
            .iter()
            .map(|s| {
                s.tensors()
                    .iter()
                    .map(|t| t.chunks.iter().map(|_| AtomicBool::new(false)).collect())
                    .collect()
            })
            .collect();
        SourceDigests {
            claimed,
            digests: Mutex::new(Vec::new()),
            chunks: Mutex::new(Vec::new()),
        }
    }

    /// Digests (and checks the CRC of) every chunk the box of `input` touches, each
    /// chunk once per run. `known` is the digest of the box's bytes, when the caller
    /// has it and the box is exactly one contiguous chunk.
    fn visit(
        &self,
        stores: &[&dyn TensorStore],
        input: &Input,
        known: Option<u128>,
    ) -> Result<(), ExecuteError> {
        let (store, tensor) = (input.store, input.tensor);
        let s = stores[store];
        let t = &s.tensors()[tensor];
        for (c, chunk) in touched(t, input) {
            if self.claimed[store][tensor][c].swap(true, Ordering::AcqRel) {
                continue;
            }
            let region = chunk.footprint();
            let whole = chunk.offsets == input.offsets
                && chunk.sizes == input.sizes
                && matches!(chunk.data, crate::formats::source::ChunkData::Contiguous(_));
            let digest = match known {
                Some(d) if whole => d,
                _ => xxh3_128(s.files().slice(region)),
            };
            if let Some((record, crc)) = chunk.checksum {
                let actual = crc32fast::hash(s.files().slice(record));
                if actual != crc {
                    return Err(ExecuteError::Corrupt {
                        path: s.files().get(record.file).path.clone(),
                        tensor: t.name.clone(),
                        why: format!(
                            "chunk at {:?}: CRC-32 {actual:08x} does not match the archive's {crc:08x}",
                            chunk.offsets
                        ),
                    });
                }
            }
            let line = format!(
                "{}|{:?}|{:?}|{}|{:032x}\n",
                t.name, chunk.offsets, chunk.sizes, t.dtype, digest
            );
            self.digests
                .lock()
                .expect("digest lock")
                .push((store, line));
            self.chunks.lock().expect("digest lock").push(ChunkDigest {
                store,
                tensor,
                chunk: c,
                xxh3: digest,
            });
        }
        Ok(())
    }

    fn finish(self, nstores: usize) -> (Vec<String>, Vec<ChunkDigest>, Vec<(usize, String)>) {
        let chunks = self.chunks.into_inner().expect("digest lock");
        let lines = self.digests.into_inner().expect("digest lock");
        (store_digests(nstores, &lines), chunks, lines)
    }
}

/// The digest of each store's source chunk lines (`(store, line)` pairs).
pub fn store_digests(nstores: usize, lines: &[(usize, String)]) -> Vec<String> {
    (0..nstores)
        .map(|s| {
            crate::formats::digest::of_lines(
                lines
                    .iter()
                    .filter(|(st, _)| *st == s)
                    .map(|(_, l)| l.clone())
                    .collect(),
            )
        })
        .collect()
}

/// Test hook: see [`crate::failpoint`] (`pieces:N`).
fn failpoint(done: u64) {
    crate::failpoint::pieces(done);
}

/// Test hooks that make a run produce a wrong output (with the `failpoints`
/// feature), so tests can show that validation catches it and publishes nothing.
/// Each is applied before the piece's digest is taken, as a faulty kernel would:
/// - `CKPT_CONVERT_FAIL_MERGE_SCALE=F` multiplies the scale of every merge update by F;
/// - `CKPT_CONVERT_FAIL_UNMERGED_ROW=PIECE:ROW` leaves that row of a merged piece
///   as it was before the merge;
/// - `CKPT_CONVERT_FAIL_SWAP_ROWS=PIECE:A:B:N` swaps rows `A..A+N` and `B..B+N` of
///   a piece's output (two attention heads trading places).
#[cfg(feature = "failpoints")]
mod faults {
    use crate::plan::{LoraMerge, Piece, Update};

    fn var(name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }

    /// `PIECE:N:N…` when it names `piece`: the numbers.
    fn for_piece(name: &str, piece: &Piece) -> Option<Vec<u64>> {
        let v = var(name)?;
        let mut parts: Vec<&str> = v.split(':').collect();
        let mut numbers = Vec::new();
        while let Some(n) = parts.last().and_then(|p| p.parse::<u64>().ok()) {
            numbers.insert(0, n);
            parts.pop();
        }
        (parts.join(":") == piece.name).then_some(numbers)
    }

    pub fn merge(m: &LoraMerge) -> Option<LoraMerge> {
        let f: f32 = var("CKPT_CONVERT_FAIL_MERGE_SCALE")?.parse().ok()?;
        let mut m = m.clone();
        for u in &mut m.updates {
            match u {
                Update::Linear { scale, .. }
                | Update::Embedding { scale, .. }
                | Update::Bias { scale, .. } => *scale *= f,
                Update::Rows { .. } => {}
            }
        }
        Some(m)
    }

    pub fn unmerged_row(piece: &Piece) -> Option<u64> {
        for_piece("CKPT_CONVERT_FAIL_UNMERGED_ROW", piece)?
            .first()
            .copied()
    }

    pub fn swap_rows(piece: &Piece) -> Option<(u64, u64, u64)> {
        match for_piece("CKPT_CONVERT_FAIL_SWAP_ROWS", piece)?[..] {
            [a, b, n] => Some((a, b, n)),
            _ => None,
        }
    }
}

#[cfg(not(feature = "failpoints"))]
mod faults {
    use crate::plan::{LoraMerge, Piece};

    pub fn merge(_: &LoraMerge) -> Option<LoraMerge> {
        None
    }

    pub fn unmerged_row(_: &Piece) -> Option<u64> {
        None
    }

    pub fn swap_rows(_: &Piece) -> Option<(u64, u64, u64)> {
        None
    }
}

/// Runs `plan` against `stores`, writing under `root` (a fresh staging directory).
///
/// # Errors
/// [`ExecuteError`] naming the file and tensor; what was written stays in `root`
/// for the caller to discard.
pub fn execute(
    plan: &Plan,
    stores: &[&dyn TensorStore],
    root: &Path,
    opts: &Options,
    progress: &dyn Progress,
) -> Result<Outcome, ExecuteError> {
    let pool = opts.pool(WORKERS)?;
    pool.install(|| execute_with(plan, stores, root, opts, progress, &Unobserved, |_| ()))
        .map(|(outcome, ())| outcome)
}

/// The name of the conversion's worker threads (`ckpt-worker-0`, …).
pub const WORKERS: &str = "worker";

impl Options {
    /// A worker pool of [`Options::threads`] threads named `ckpt-NAME-I` (what
    /// `top -H`, `ps -L` and a debugger show), for callers that run more work
    /// beside an execution on the same workers.
    ///
    /// # Errors
    /// [`ExecuteError::Plan`] when the threads cannot be started.
    pub fn pool(&self, name: &'static str) -> Result<rayon::ThreadPool, ExecuteError> {
        rayon::ThreadPoolBuilder::new()
            .num_threads(self.threads.max(1))
            .thread_name(move |i| format!("ckpt-{name}-{i}"))
            .build()
            .map_err(|e| ExecuteError::Plan(format!("cannot start worker threads: {e}")))
    }
}

fn create(root: &Path, rel: &str) -> Result<(PathBuf, File), ExecuteError> {
    let path = root.join(rel);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(io(&path))?;
    Ok((path, file))
}

/// [`execute`] on the current worker pool, with `observer` shown every piece as it
/// is written, and `then` run on the outcome while the files are still being made
/// durable (their digests are known; the final fsyncs are under way), so a check
/// of the output overlaps the wait for the disk. Returns only once every file and
/// directory is durable, with what `then` returned.
///
/// # Errors
/// [`ExecuteError`], as [`execute`]; `then` has not run when writing failed.
pub fn execute_with<R>(
    plan: &Plan,
    stores: &[&dyn TensorStore],
    root: &Path,
    opts: &Options,
    progress: &dyn Progress,
    observer: &dyn Observer,
    then: impl FnOnce(&Outcome) -> R,
) -> Result<(Outcome, R), ExecuteError> {
    check(plan, stores)?;

    // Lay out every data file before any tensor moves.
    let mut outputs: Vec<(PathBuf, File)> = Vec::with_capacity(plan.files.len());
    // Buffered writes to one file serialize on its inode lock, and a writer that
    // waits there spins; waiting here instead sleeps, leaving the core to a piece
    // that is still gathering or digesting.
    let write_locks: Vec<Mutex<()>> = plan.files.iter().map(|_| Mutex::new(())).collect();
    for f in &plan.files {
        let (path, file) = create(root, &f.rel)?;
        file.set_len(f.len).map_err(io(&path))?;
        for (offset, bytes) in &f.fixed {
            file.write_all_at(bytes, *offset).map_err(io(&path))?;
        }
        outputs.push((path, file));
    }

    let footprint = |p: &Piece| -> u64 {
        let inputs: u64 = p
            .inputs
            .iter()
            .map(|i| i.numel() * stores[i.store].tensors()[i.tensor].dtype.size() as u64)
            .sum();
        let scratch = p
            .merge
            .as_ref()
            .map_or(0, |m| crate::plan::merge::scratch_bytes(m, &p.shape));
        inputs + p.nbytes() + scratch
    };
    let largest = plan.pieces.iter().map(footprint).max().unwrap_or(0);
    let budget = Budget {
        limit: opts.memory_budget.unwrap_or(largest.max(512 << 20)).max(1),
        used: Mutex::new(0),
        peak: AtomicU64::new(0),
        freed: Condvar::new(),
    };
    let sources = SourceDigests::new(stores);
    let piece_digests: Mutex<Vec<String>> = Mutex::new(Vec::with_capacity(plan.pieces.len()));
    // The same digests by piece, for the read-back to compare with.
    let written: Mutex<BTreeMap<&str, String>> = Mutex::new(BTreeMap::new());
    let done = AtomicU64::new(0);
    let started = std::time::Instant::now();
    progress.phase("convert", plan.tensor_bytes());

    plan.pieces
        .par_iter()
        .try_for_each(|piece| -> Result<(), ExecuteError> {
            let charge = budget.acquire(footprint(piece));
            let result = write_piece(piece, stores, &outputs, &write_locks, &sources, observer);
            budget.release(charge);
            let digest = result?;
            piece_digests.lock().expect("digest lock").push(format!(
                "{}|{}|{:?}|{digest}\n",
                piece.name, piece.dtype, piece.shape
            ));
            written
                .lock()
                .expect("digest lock")
                .insert(&piece.name, digest);
            progress.advance(piece.nbytes());
            failpoint(done.fetch_add(1, Ordering::Relaxed) + 1);
            Ok(())
        })?;

    tracing::info!(
        seconds = started.elapsed().as_secs_f64(),
        pieces = plan.pieces.len(),
        "tensor data written"
    );
    for g in &plan.generated {
        let (path, file) = create(root, &g.rel)?;
        file.write_all_at(&g.bytes, 0).map_err(io(&path))?;
        outputs.push((path, file));
    }
    for c in &plan.copied {
        let path = root.join(&c.rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        // Regular files inside their source only, exactly the length they had.
        crate::formats::file::copy(&c.from, &path)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io(&path))?;
        outputs.push((path, file));
    }

    crate::failpoint::hit("written");
    let written = written.into_inner().expect("digest lock");

    // Make every byte durable on one thread (it mostly waits for the disk) while
    // the others read the files back for their digests, then run `then`.
    let total: u64 = outputs
        .iter()
        .map(|(_, f)| f.metadata().map(|m| m.len()).unwrap_or(0))
        .sum();
    progress.phase("sync", total);
    std::thread::scope(|scope| {
        // The directories as they are now: `then` may add files beside them
        // (it makes its own durable).
        let dirs = dirs_under(root);
        let durable = scope.spawn(|| -> Result<(), ExecuteError> {
            for (path, file) in &outputs {
                file.sync_all().map_err(io(path))?;
            }
            for dir in dirs? {
                File::open(&dir)
                    .and_then(|d| d.sync_all())
                    .map_err(io(&dir))?;
            }
            Ok(())
        });
        // Each file is read once: its digest, and each piece's data in it.
        let in_file = pieces_by_file(plan, outputs.len());
        let digested = outputs
            .par_iter()
            .zip(&in_file)
            .map(|((path, _), (pieces, ranges))| -> Result<_, ExecuteError> {
                let (size, digest, read) =
                    crate::formats::digest::file_and_ranges(path, ranges).map_err(io(path))?;
                progress.advance(size);
                let rel = path
                    .strip_prefix(root)
                    .expect("outputs live under the root")
                    .to_string_lossy()
                    .into_owned();
                let read_back = pieces
                    .iter()
                    .zip(read)
                    .zip(ranges)
                    .map(|((p, (h, bad)), &(offset, ..))| {
                        let found = crate::formats::digest::format_digest(h);
                        let was = written.get(p.name.as_str()).cloned().unwrap_or_default();
                        if found != was {
                            return Err(ExecuteError::ReadBack {
                                path: path.clone(),
                                tensor: p.name.clone(),
                                offset,
                                end: offset + p.nbytes(),
                                written: was,
                                found,
                            });
                        }
                        Ok((p.name.clone(), (h, bad)))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok((
                    FileRecord {
                        path: rel,
                        size,
                        xxh3: digest,
                    },
                    read_back,
                ))
            })
            .collect::<Result<Vec<_>, _>>();
        let outcome = digested.map(|digested| {
            let mut files = Vec::with_capacity(digested.len());
            let mut read_back = BTreeMap::new();
            for (file, pieces) in digested {
                files.push(file);
                read_back.extend(pieces);
            }
            files.sort_by(|a, b| a.path.cmp(&b.path));
            let (source_digests, source_chunks, source_lines) = sources.finish(stores.len());
            let piece_lines = piece_digests.into_inner().expect("digest lock");
            Outcome {
                files,
                weights_digest: crate::formats::digest::of_lines(piece_lines.clone()),
                piece_lines,
                source_lines,
                source_digests,
                source_chunks,
                pieces: plan.pieces.len(),
                tensor_bytes: plan.tensor_bytes(),
                peak_in_flight: budget.peak.load(Ordering::Relaxed),
                read_back,
            }
        });
        let after = outcome.as_ref().ok().map(then);
        let synced = durable.join().expect("the fsync thread does not panic");
        let outcome = outcome?;
        synced?;
        tracing::info!(
            seconds = started.elapsed().as_secs_f64(),
            "outputs synced and digested"
        );
        Ok((outcome, after.expect("then ran on the outcome")))
    })
}

/// The pieces whose data lies in each of the first `files` output files of
/// `plan` (by file index), sorted by where their data starts, with the ranges a
/// read-back of the file digests ([`crate::formats::digest::file_and_ranges`]).
pub fn pieces_by_file(
    plan: &Plan,
    files: usize,
) -> Vec<(Vec<&Piece>, Vec<crate::formats::digest::Range>)> {
    let mut in_file: Vec<Vec<(u64, &Piece)>> = vec![Vec::new(); files];
    for p in &plan.pieces {
        let (file, offset) = data_at(p);
        in_file[file].push((offset, p));
    }
    in_file
        .into_iter()
        .map(|mut pieces| {
            // A zero-length piece before another at its offset: the ranges are
            // sorted and disjoint.
            pieces.sort_by_key(|(offset, p)| (*offset, p.nbytes()));
            let ranges = pieces
                .iter()
                .map(|(offset, p)| (*offset, p.nbytes(), p.dtype))
                .collect();
            (pieces.into_iter().map(|(_, p)| p).collect(), ranges)
        })
        .collect()
}

/// The archive a `.distcp` item of `piece` is written as, around its data.
fn dcp_item_layout(piece: &Piece, crc: u32) -> torch_zip::ArchiveLayout {
    torch_zip::layout_archive(
        &torch_save::tensor_archive_records(piece.dtype, &piece.shape, piece.nbytes()),
        crc,
    )
}

/// The output file and byte offset where `piece`'s data (its elements, without
/// the archive around a `.distcp` item) is written.
pub fn data_at(piece: &Piece) -> (usize, u64) {
    match &piece.dest {
        Dest::Raw { file, offset } => (*file, *offset),
        // The archive's length does not depend on the checksum's value.
        Dest::DcpItem { file, offset } => (
            *file,
            offset + dcp_item_layout(piece, 0).prefix.len() as u64,
        ),
    }
}

/// Produces one piece and writes it; returns the xxh3-128 of its bytes.
fn write_piece(
    piece: &Piece,
    stores: &[&dyn TensorStore],
    outputs: &[(PathBuf, File)],
    write_locks: &[Mutex<()>],
    sources: &SourceDigests,
    observer: &dyn Observer,
) -> Result<String, ExecuteError> {
    let mut in_dtypes: Vec<DType> = Vec::with_capacity(piece.inputs.len());
    let mut in_bytes: Vec<Cow<'_, [u8]>> = Vec::with_capacity(piece.inputs.len());
    for input in &piece.inputs {
        let store = stores[input.store];
        let t = &store.tensors()[input.tensor];
        for (_, c) in touched(t, input) {
            let r = c.footprint();
            store.files().get(r.file).will_need(r.offset, r.len);
        }
        in_dtypes.push(t.dtype);
        in_bytes.push(read_box(store.files(), t, &input.offsets, &input.sizes));
    }
    let row_len = piece.gather.row_len.max(1);
    let plain_copy = piece.merge.is_none()
        && piece.inputs.len() == 1
        && in_dtypes[0] == piece.dtype
        && piece.gather.runs.len() == 1
        && piece.gather.runs[0].input == Some(0)
        && piece.gather.runs[0].start == 0
        && piece.gather.runs[0].rows * row_len == piece.inputs[0].numel();
    let data: Cow<'_, [u8]> = if plain_copy {
        // Zero-copy: the mapped source goes straight to the positioned write.
        in_bytes.swap_remove(0)
    } else {
        let oes = piece.dtype.size() as u64;
        let mut out = vec![0u8; piece.nbytes() as usize];
        // A merge reads a weight that is one whole input of the piece's dtype in
        // place, rather than from a gathered copy.
        let in_place = piece.merge.is_some()
            && in_dtypes[0] == piece.dtype
            && piece.gather.runs.len() == 1
            && piece.gather.runs[0].input == Some(0)
            && piece.gather.runs[0].start == 0
            && piece.gather.runs[0].rows * row_len == piece.inputs[0].numel();
        let mut row = 0u64;
        for run in piece.gather.runs.iter().filter(|_| !in_place) {
            let dst = &mut out
                [(row * row_len * oes) as usize..((row + run.rows) * row_len * oes) as usize];
            if let Some(i) = run.input {
                let ies = in_dtypes[i].size() as u64;
                let src = &in_bytes[i][(run.start * row_len * ies) as usize
                    ..((run.start + run.rows) * row_len * ies) as usize];
                cast_into(in_dtypes[i], src, piece.dtype, dst);
            }
            row += run.rows;
        }
        if let Some(merge) = &piece.merge {
            let inputs: Vec<(DType, &[u8])> = in_dtypes
                .iter()
                .zip(&in_bytes)
                .map(|(d, b)| (*d, b.as_ref()))
                .collect();
            let base = in_place.then(|| in_bytes[0].as_ref());
            let faulty = faults::merge(merge);
            let merge = faulty.as_ref().unwrap_or(merge);
            let row_bytes = (piece.shape.last().copied().unwrap_or(1) * oes) as usize;
            let kept = faults::unmerged_row(piece).map(|r| {
                let at = r as usize * row_bytes;
                let before: &[u8] = base.unwrap_or(&out);
                (at, before[at..at + row_bytes].to_vec())
            });
            crate::plan::merge::apply(merge, piece.dtype, &piece.shape, &inputs, base, &mut out);
            if let Some((at, row)) = kept {
                out[at..at + row.len()].copy_from_slice(&row);
            }
        }
        Cow::Owned(out)
    };
    let mut data = data;
    if let Some((a, b, n)) = faults::swap_rows(piece) {
        let row = (piece.shape.last().copied().unwrap_or(1) * piece.dtype.size() as u64) as usize;
        let d = data.to_mut();
        for i in 0..n as usize {
            let (x, y) = ((a as usize + i) * row, (b as usize + i) * row);
            let tmp = d[x..x + row].to_vec();
            d.copy_within(y..y + row, x);
            d[y..y + row].copy_from_slice(&tmp);
        }
    }
    let (file, data_at) = data_at(piece);
    let ((path, f), lock) = (&outputs[file], &write_locks[file]);
    let digest = match &piece.dest {
        Dest::Raw { .. } => {
            let digest = write_hashed(f, path, lock, &data, data_at, None)?;
            start_writeback(f, data_at, data.len() as u64);
            digest
        }
        Dest::DcpItem { offset, .. } => {
            // The archive's length does not depend on its checksum, so the data
            // goes first and the header that holds the checksum after it.
            let mut crc = crc32fast::Hasher::new();
            let digest = write_hashed(f, path, lock, &data, data_at, Some(&mut crc))?;
            let layout = dcp_item_layout(piece, crc.finalize());
            let turn = lock.lock().expect("write lock");
            f.write_all_at(&layout.prefix, *offset).map_err(io(path))?;
            f.write_all_at(&layout.suffix, data_at + data.len() as u64)
                .map_err(io(path))?;
            drop(turn);
            start_writeback(f, *offset, layout.len());
            digest
        }
    };
    // A plain copy of one whole chunk is that chunk's bytes: its digest is the
    // source digest too, so the bytes are hashed once.
    let known = plain_copy.then_some(digest);
    for input in &piece.inputs {
        sources.visit(stores, input, known)?;
    }
    observer.written(piece, &data);
    drop(data);
    drop(in_bytes);
    // Release the mapped inputs so resident memory follows the pieces in flight.
    for input in &piece.inputs {
        let store = stores[input.store];
        for (_, c) in touched(&store.tensors()[input.tensor], input) {
            let r = c.footprint();
            store.files().get(r.file).release(r.offset, r.len);
        }
    }
    Ok(crate::formats::digest::format_digest(digest))
}

/// Bytes of a piece hashed, then written, at a time: the hash reads them from
/// memory into the cache and the write copies them from there, so a piece's
/// bytes cross the memory bus once on their way out, not once per pass.
const WRITE_BLOCK: usize = 256 << 10;

/// Writes `data` at `at` in blocks, each hashed (and added to `crc`) just
/// before it is written; returns the xxh3-128 of all of it.
fn write_hashed(
    f: &File,
    path: &Path,
    lock: &Mutex<()>,
    data: &[u8],
    at: u64,
    mut crc: Option<&mut crc32fast::Hasher>,
) -> Result<u128, ExecuteError> {
    let mut hash = Xxh3::new();
    let mut offset = at;
    for block in data.chunks(WRITE_BLOCK) {
        hash.update(block);
        if let Some(c) = crc.as_deref_mut() {
            c.update(block);
        }
        let turn = lock.lock().expect("write lock");
        f.write_all_at(block, offset).map_err(io(path))?;
        drop(turn);
        offset += block.len() as u64;
    }
    Ok(hash.digest128())
}

/// Starts writing a just-written range to disk without waiting for it, so the disk
/// works while later pieces are computed and the final fsync waits only for the
/// tail. (Background writeback would start only past the dirty-memory threshold.)
/// Advisory: errors surface at the fsync that follows.
#[cfg(target_os = "linux")]
fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain system call on an open descriptor we own.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as i64,
            len as i64,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_: &File, _: u64, _: u64) {}

/// `root` and every directory under it.
fn dirs_under(root: &Path) -> Result<Vec<PathBuf>, ExecuteError> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(io(&dir))? {
            let entry = entry.map_err(io(&dir))?;
            if entry.file_type().map_err(io(&dir))?.is_dir() {
                stack.push(entry.path());
            }
        }
        out.push(dir);
    }
    Ok(out)
}

/// Fsyncs `root` and every directory under it, so new entries are durable.
///
/// # Errors
/// The I/O error of opening or syncing a directory.
pub fn sync_dirs(root: &Path) -> Result<(), ExecuteError> {
    for dir in dirs_under(root)? {
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&dir))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::hf::HfCheckpoint;
    use crate::plan::{Input, OutFile, RowGather, Run};

    #[test]
    fn a_piece_written_in_blocks_is_its_bytes_with_their_digest_and_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        // Two whole blocks and a ragged tail, written after a 7-byte gap.
        let data: Vec<u8> = (0..2 * WRITE_BLOCK + 12_345)
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        let mut crc = crc32fast::Hasher::new();
        let digest = write_hashed(&f, &path, &Mutex::new(()), &data, 7, Some(&mut crc)).unwrap();
        assert_eq!(digest, xxh3_128(&data));
        assert_eq!(crc.finalize(), crc32fast::hash(&data));
        let written = std::fs::read(&path).unwrap();
        assert_eq!(written.len(), 7 + data.len());
        assert_eq!(&written[7..], &data[..]);
    }

    /// A one-file HF store with one f32 tensor `t` of shape [3, 2] = 0..6.
    fn store(dir: &Path) -> HfCheckpoint {
        let values: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let layout = crate::formats::safetensors::layout(
            &[("t".into(), DType::F32, vec![3, 2])],
            &crate::formats::safetensors::pt_metadata(),
        )
        .unwrap();
        let mut bytes = layout.header.clone();
        bytes.extend_from_slice(&values);
        std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
        HfCheckpoint::open(dir).unwrap()
    }

    fn piece(gather: RowGather, shape: Vec<u64>, dtype: DType) -> Piece {
        Piece {
            name: "out".into(),
            dtype,
            shape,
            inputs: vec![Input {
                store: 0,
                tensor: 0,
                offsets: vec![0, 0],
                sizes: vec![3, 2],
            }],
            gather,
            dest: Dest::Raw { file: 0, offset: 0 },
            transform: "test".into(),
            merge: None,
        }
    }

    #[test]
    fn gathers_rows_pads_with_zeros_and_casts() {
        let dir = tempfile::tempdir().unwrap();
        let src = store(dir.path());
        let gather = RowGather {
            row_len: 2,
            runs: vec![
                Run {
                    input: Some(0),
                    start: 2,
                    rows: 1,
                },
                Run {
                    input: None,
                    start: 0,
                    rows: 1,
                },
                Run {
                    input: Some(0),
                    start: 0,
                    rows: 1,
                },
            ],
        };
        let p = piece(gather, vec![3, 2], DType::BF16);
        let plan = Plan {
            files: vec![OutFile {
                rel: "o".into(),
                len: 12,
                fixed: vec![],
            }],
            pieces: vec![p],
            ..Plan::default()
        };
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let stores: [&dyn TensorStore; 1] = [&src];
        let outcome = execute(
            &plan,
            &stores,
            &out,
            &Options {
                threads: 2,
                memory_budget: Some(1),
            },
            &Silent,
        )
        .unwrap();
        let bytes = std::fs::read(out.join("o")).unwrap();
        let vals: Vec<f32> = bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
            .collect();
        assert_eq!(vals, vec![4.0, 5.0, 0.0, 0.0, 0.0, 1.0]);
        assert_eq!(outcome.files.len(), 1);
        assert_eq!(outcome.files[0].xxh3, crate::formats::digest::hex(&bytes));
    }

    #[test]
    fn inconsistent_plans_are_refused_before_writing() {
        let dir = tempfile::tempdir().unwrap();
        let src = store(dir.path());
        let stores: [&dyn TensorStore; 1] = [&src];
        let too_many_rows = piece(RowGather::copy(4, 2), vec![4, 2], DType::F32);
        let past_end = piece(
            RowGather {
                row_len: 2,
                runs: vec![Run {
                    input: Some(0),
                    start: 2,
                    rows: 2,
                }],
            },
            vec![2, 2],
            DType::F32,
        );
        let int_cast = {
            let mut p = piece(RowGather::copy(3, 2), vec![3, 2], DType::I64);
            p.transform = "cast".into();
            p
        };
        for p in [too_many_rows, past_end, int_cast] {
            let plan = Plan {
                pieces: vec![p],
                ..Plan::default()
            };
            assert!(matches!(check(&plan, &stores), Err(ExecuteError::Plan(_))));
        }
    }
}
