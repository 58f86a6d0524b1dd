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
//!   cleans up and ends the process with exit code 1 (the run failed). Every
//!   worker reading that source faults, one after another: the handler is our
//!   own `sigaction`, not a chained one, because the handler it would chain to
//!   (the Rust runtime's stack-overflow check) resets SIGBUS to its default on
//!   a fault outside a guard page, and the second faulting worker would then
//!   kill the process before anything is cleaned up or reported.
//!
//! A commit and this cleanup exclude each other ([`commit_guard`]): an output is
//! either renamed into place whole, or its staging directory is removed whole,
//! never a mix. SIGKILL cannot be handled; what it leaves is found by the next run
//! or `ckpt-convert clean` (see the parent module).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use super::PublishError;

struct Active {
    dir: PathBuf,
    created: Vec<PathBuf>,
}

static ACTIVE: Mutex<Vec<Active>> = Mutex::new(Vec::new());
static COMMIT: Mutex<()> = Mutex::new(());
static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// Threads that faulted reading a mapping (each is parked for good).
static BUS_FAULTS: AtomicUsize = AtomicUsize::new(0);
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
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
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
    extern "C" fn on_bus_fault(_: libc::c_int) {
        BUS_FAULTS.fetch_add(1, Ordering::SeqCst);
        // SAFETY: raise and pause are async-signal-safe. The faulting thread
        // cannot resume the read that faulted: it stays parked, and the signal
        // thread ends the process.
        unsafe {
            libc::raise(libc::SIGTERM);
            loop {
                libc::pause();
            }
        }
    }
    // SAFETY: a zeroed sigaction is valid; the handler only touches an atomic
    // and calls async-signal-safe functions. SA_ONSTACK: a fault may come on a
    // thread whose stack is nearly used up.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_bus_fault as extern "C" fn(libc::c_int) as libc::sighandler_t;
        action.sa_flags = libc::SA_ONSTACK;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    std::thread::Builder::new()
        .name("ckpt-signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                let _guard = clean_up();
                let (code, why) = if BUS_FAULTS.load(Ordering::SeqCst) > 0 {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// In a forked child: maps `path`, truncates it, and faults on the main
    /// thread; once that fault is handled, `on_exit` faults again on a new
    /// thread and waits until that one is handled too. Never returns.
    fn fault_twice(path: &Path) -> ! {
        let outcome = std::panic::catch_unwind(|| {
            let file = std::fs::File::open(path).unwrap();
            // SAFETY: the mapping is of a file only this test touches; reading
            // it after the truncation below faults, which is the point.
            let map: &'static memmap2::Mmap =
                Box::leak(Box::new(unsafe { memmap2::Mmap::map(&file) }.unwrap()));
            std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .unwrap()
                .set_len(0)
                .unwrap();
            install(Box::new(move |_, _| {
                std::thread::spawn(move || {
                    // SAFETY: in bounds of the mapping; the bytes are gone.
                    unsafe { std::ptr::read_volatile(&map[4096]) }
                });
                for _ in 0..60_000 {
                    if BUS_FAULTS.load(Ordering::SeqCst) >= 2 {
                        return;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                // SAFETY: ends the child; 3 tells the parent the second fault
                // never reached the handler.
                unsafe { libc::_exit(3) }
            }))
            .unwrap();
            // SAFETY: as above.
            unsafe { std::ptr::read_volatile(&map[0]) }
        });
        // SAFETY: ends the child without returning into the test harness.
        unsafe { libc::_exit(if outcome.is_err() { 4 } else { 5 }) }
    }

    #[test]
    fn every_thread_that_faults_on_a_truncated_source_is_handled_not_only_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("source");
        std::fs::write(&path, vec![7u8; 2 * 4096]).unwrap();
        // SAFETY: the child runs only `fault_twice`, which ends it with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            fault_twice(&path);
        }
        let mut status = 0;
        // SAFETY: waits for the child forked above.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 1,
            "expected exit 1 from the signal thread; wait status {status:#x} \
             (signalled: {}, signal {}, exit {})",
            libc::WIFSIGNALED(status),
            libc::WTERMSIG(status),
            libc::WEXITSTATUS(status)
        );
    }
}
