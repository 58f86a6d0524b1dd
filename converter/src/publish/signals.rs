//! Ending a run on a signal without leaving anything half-done. This is the one
//! place that handles signals.
//!
//! - SIGTERM, SIGINT, SIGHUP (a deleted pod, an `activeDeadlineSeconds`, Ctrl-C,
//!   a closed terminal): a thread waiting for them removes every staging
//!   directory this process has open (and the empty directories it created for
//!   them), then ends the process with 128 + the signal number. Handling them
//!   also makes them work when the converter is PID 1 in a container, where the
//!   kernel drops signals whose disposition is the default.
//! - SIGBUS: reading a memory-mapped source that was truncated under us. The
//!   faulting thread cannot continue; it hands over to the same thread, which
//!   cleans up and ends the process with exit code 1 (the run failed).
//!
//! A commit and this cleanup exclude each other ([`commit_guard`]): an output is
//! either renamed into place whole, or its staging directory is removed whole,
//! never a mix. SIGKILL cannot be handled; what it leaves is found by the next run
//! or `ckpt-convert clean` (see the parent module).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use super::PublishError;

struct Active {
    dir: PathBuf,
    created: Vec<PathBuf>,
}

static ACTIVE: Mutex<Vec<Active>> = Mutex::new(Vec::new());
static COMMIT: Mutex<()> = Mutex::new(());
static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static BUS_FAULT: AtomicBool = AtomicBool::new(false);
static PUBLISHED: AtomicBool = AtomicBool::new(false);

fn active() -> MutexGuard<'static, Vec<Active>> {
    ACTIVE.lock().unwrap_or_else(|e| e.into_inner())
}

pub(super) fn register(dir: &Path, created: &[PathBuf]) {
    active().push(Active {
        dir: dir.to_owned(),
        created: created.to_vec(),
    });
}

pub(super) fn deregister(dir: &Path) {
    active().retain(|a| a.dir != dir);
}

/// An output of this process is in place.
pub(super) fn published() {
    PUBLISHED.store(true, Ordering::SeqCst);
}

/// Held while a commit renames. Once a stop signal has arrived no commit starts:
/// the signal thread is about to clean up and end the process with the signal's
/// exit code, so the caller waits for that (bounded) rather than racing it with an
/// exit code of its own.
pub(super) fn commit_guard() -> Result<MutexGuard<'static, ()>, PublishError> {
    let guard = COMMIT.lock().unwrap_or_else(|e| e.into_inner());
    if INTERRUPTED.load(Ordering::SeqCst) {
        drop(guard);
        std::thread::sleep(std::time::Duration::from_secs(60));
        return Err(PublishError::Interrupted);
    }
    Ok(guard)
}

/// Removes every registered staging directory; the commit lock stays held, so no
/// commit starts afterwards.
fn clean_up() -> MutexGuard<'static, ()> {
    INTERRUPTED.store(true, Ordering::SeqCst);
    let guard = COMMIT.lock().unwrap_or_else(|e| e.into_inner());
    for a in active().iter() {
        // Workers may still be creating files in it: try a few times.
        for _ in 0..5 {
            if std::fs::remove_dir_all(&a.dir).is_ok() || !a.dir.exists() {
                break;
            }
        }
        for d in a.created.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
    guard
}

/// How the process ends once it has cleaned up: the exit code and why.
pub type OnExit = Box<dyn Fn(i32, &str) + Send + 'static>;

/// Installs the handlers (once; later calls do nothing). `on_exit` runs after
/// the cleanup, just before the process ends, to report the outcome (the
/// termination message).
///
/// # Errors
/// The I/O error of installing a handler.
pub fn install(on_exit: OnExit) -> std::io::Result<()> {
    use signal_hook::consts::{SIGBUS, SIGHUP, SIGINT, SIGTERM};
    static INSTALLED: AtomicBool = AtomicBool::new(false);
    if INSTALLED.swap(true, Ordering::SeqCst) {
        return Ok(());
    }
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    // Marked in the handler itself, so that a commit is refused from the moment
    // the signal arrives, not from when the signal thread first runs (on a
    // CPU-throttled pod that can be seconds later, time enough to publish after
    // an `activeDeadlineSeconds` or a deletion).
    for sig in [SIGTERM, SIGINT, SIGHUP] {
        // SAFETY: the action only stores to an atomic (async-signal-safe).
        unsafe {
            signal_hook::low_level::register(sig, || INTERRUPTED.store(true, Ordering::SeqCst))?;
        }
    }
    // SAFETY: the action only stores to an atomic and raises a signal (both
    // async-signal-safe), then parks the faulting thread for good: it cannot
    // resume the read that faulted, and the waiting thread ends the process.
    unsafe {
        signal_hook::low_level::register(SIGBUS, || {
            BUS_FAULT.store(true, Ordering::SeqCst);
            let _ = signal_hook::low_level::raise(SIGTERM);
            loop {
                libc::pause();
            }
        })?;
    }
    std::thread::Builder::new()
        .name("ckpt-signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                let _guard = clean_up();
                let (code, why) = if BUS_FAULT.load(Ordering::SeqCst) {
                    (
                        1,
                        "a source file was truncated or became unreadable while the conversion read it; nothing was published".to_owned(),
                    )
                } else {
                    let name = signal_hook::low_level::signal_name(sig).unwrap_or("a signal");
                    let what = if PUBLISHED.load(Ordering::SeqCst) {
                        "outputs already in place stay, nothing else was published"
                    } else {
                        "nothing was published"
                    };
                    (
                        128 + sig,
                        format!("interrupted by {name}; {what}, staging removed"),
                    )
                };
                on_exit(code, &why);
                // SAFETY: ends the process without running destructors or other
                // threads' code further; nothing of ours needs them now.
                unsafe { libc::_exit(code) }
            }
        })?;
    Ok(())
}
