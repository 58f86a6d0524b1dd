//! What the benchmarks share: running a child process and reading its wall time
//! and peak resident memory from the kernel's accounting (`wait4`).

use std::process::{Command, Stdio};
use std::time::Instant;

/// A measured run.
pub struct Measured {
    /// Wall time.
    pub seconds: f64,
    /// Peak resident memory, in bytes.
    pub max_rss: u64,
}

/// Runs a command (stdout discarded) and returns its wall time and peak RSS.
pub fn measure(cmd: &mut Command) -> Measured {
    let start = Instant::now();
    let child = cmd.stdout(Stdio::null()).spawn().expect("spawn");
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain data filled by the kernel; pid is our live child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid, "wait4 failed");
    let seconds = start.elapsed().as_secs_f64();
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{cmd:?} failed ({status})"
    );
    // Reaped by wait4 above: the handle must not wait again.
    std::mem::forget(child);
    Measured {
        seconds,
        max_rss: usage.ru_maxrss as u64 * 1024,
    }
}

/// Bytes in GiB.
pub fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}
