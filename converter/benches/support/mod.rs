//! What the benchmarks share: running a child process and reading its wall time,
//! CPU time and peak resident memory from the kernel's accounting (`wait4`), the durable
//! copy baseline, dropping an input's pages for cold runs, medians, and the
//! machine's state printed beside the figures.

#![allow(dead_code)]

pub mod models;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// A measured run.
#[derive(Debug, Clone, Default)]
pub struct Measured {
    /// Wall time.
    pub seconds: f64,
    /// Peak resident memory, in bytes.
    pub max_rss: u64,
    /// CPU time, user and system, of the child and its threads.
    pub cpu_seconds: f64,
    /// Standard output.
    pub stdout: String,
}

/// Runs a command and returns its wall time, peak RSS, CPU time and standard output.
pub fn measure(cmd: &mut Command) -> Measured {
    let start = Instant::now();
    let mut child = cmd.stdout(Stdio::piped()).spawn().expect("spawn");
    let mut out = child.stdout.take().expect("piped stdout");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut out, &mut s).expect("read stdout");
        s
    });
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain data filled by the kernel; pid is our live child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid, "wait4 failed");
    let seconds = start.elapsed().as_secs_f64();
    let stdout = reader.join().expect("stdout reader");
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{cmd:?} failed ({status}): {stdout}"
    );
    // Reaped by wait4 above: the handle must not wait again.
    std::mem::forget(child);
    Measured {
        seconds,
        max_rss: usage.ru_maxrss as u64 * 1024,
        cpu_seconds: [usage.ru_utime, usage.ru_stime]
            .iter()
            .map(|t| t.tv_sec as f64 + t.tv_usec as f64 / 1e6)
            .sum(),
        stdout,
    }
}

/// Bytes in GiB.
pub fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

/// Every file under `dir` (or `dir` itself, when it is a file).
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    if dir.is_file() {
        return vec![dir.to_owned()];
    }
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Bytes of the files under `dir`.
pub fn size_of(dir: &Path) -> u64 {
    files_under(dir)
        .iter()
        .map(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
        .sum()
}

/// `cp -r src dst` then `sync` of every copied file: the durable-copy baseline.
pub fn durable_copy(src: &Path, dst: &Path) -> Measured {
    let _ = std::fs::remove_dir_all(dst);
    let start = Instant::now();
    let cp = measure(Command::new("cp").arg("-r").arg(src).arg(dst));
    let mut sync = Command::new("sync");
    sync.args(files_under(dst));
    let synced = measure(&mut sync);
    Measured {
        seconds: start.elapsed().as_secs_f64(),
        max_rss: cp.max_rss,
        cpu_seconds: cp.cpu_seconds + synced.cpu_seconds,
        stdout: String::new(),
    }
}

/// Whether runs start with the inputs' pages in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cache {
    /// As the previous run left them.
    Warm,
    /// Dropped first: `posix_fadvise(POSIX_FADV_DONTNEED)` on every input file
    /// (after `sync`, so no page is dirty); other processes' pages stay.
    Cold,
}

impl Cache {
    /// `warm` or `cold`.
    pub fn name(self) -> &'static str {
        match self {
            Cache::Warm => "warm",
            Cache::Cold => "cold",
        }
    }
}

/// Flushes what earlier runs left dirty (untimed), then, for a cold run, drops
/// the pages of every file under `inputs`.
pub fn settle(cache: Cache, inputs: &[&Path]) {
    Command::new("sync").status().expect("sync");
    if cache == Cache::Warm {
        return;
    }
    for input in inputs {
        for p in files_under(input) {
            let f = std::fs::File::open(&p).expect("open an input");
            use std::os::fd::AsRawFd;
            // SAFETY: a plain system call on a descriptor we own.
            let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            assert_eq!(r, 0, "posix_fadvise {}", p.display());
        }
    }
}

/// The median of `v` (the upper one of an even count).
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

/// Seconds rounded to hundredths, for the lists of runs.
pub fn rounded(v: &[f64]) -> Vec<f64> {
    v.iter().map(|s| (s * 100.0).round() / 100.0).collect()
}

/// The load averages (1, 5, 15 minutes), as `uptime` prints them.
pub fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// Free bytes on the filesystem of `path`.
pub fn free_bytes(path: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("a path without NUL");
    // SAFETY: statvfs fills a plain struct from a NUL-terminated path.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::statvfs(c.as_ptr(), &mut s) };
    if r != 0 {
        return 0;
    }
    s.f_bavail as u64 * s.f_frsize as u64
}

/// Whether `root` has room for a model of `bytes` (its source `src`, which may
/// be there already, and an output of the same size); says so when not.
pub fn room_for(name: &str, bytes: u64, root: &Path, src: &Path) -> bool {
    let need = 2 * bytes + (1 << 30);
    let have = if src.exists() { size_of(src) } else { 0 };
    let free = free_bytes(root) + have;
    if free < need {
        println!(
            "{name}: skipped: needs {:.1} GiB free in {} (source and output), {:.1} GiB are",
            gib(need),
            root.display(),
            gib(free)
        );
    }
    free >= need
}

/// One line about the machine: cores, memory, the benchmark directory's
/// filesystem, and the load now.
pub fn machine(root: &Path) -> String {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<u64>().ok())
        })
        .map_or(0.0, |k| k as f64 / (1 << 20) as f64);
    format!(
        "{cores} cores, {mem:.0} GiB memory, {} free on the filesystem of {}, load {}",
        format_args!("{:.1} GiB", gib(free_bytes(root))),
        root.display(),
        load()
    )
}

/// The value at a JSON pointer of `text`, as f64.
pub fn json_f64(text: &str, pointer: &str) -> Option<f64> {
    serde_json::from_str::<serde_json::Value>(text)
        .ok()?
        .pointer(pointer)?
        .as_f64()
}
