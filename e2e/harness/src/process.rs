//! Child processes that never outlive the test process.
//!
//! Two mechanisms, because `Drop` does not run when a test binary aborts or is
//! killed:
//!
//! * every child gets `prctl(PR_SET_PDEATHSIG, SIGKILL)` before `exec`;
//! * that signal fires when the *thread* that forked the child exits, not the
//!   process. Test threads (and the runtimes of `#[tokio::test]`) end with their
//!   test, so a control plane shared by several tests is spawned from one
//!   dedicated thread that lives as long as the process
//!   ([`spawn_from_process_thread`]).

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// Arms `PR_SET_PDEATHSIG` in a freshly forked child. Only async-signal-safe
/// calls; no allocation.
///
/// `parent` is the pid of the test process, read before the fork: if it died
/// between fork and `prctl`, the signal would never come, so exit instead.
pub(crate) fn die_with_parent(parent: libc::pid_t) -> io::Result<()> {
    // SAFETY: prctl and getppid only read their integer arguments.
    if unsafe {
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above; _exit never returns and is async-signal-safe.
    if unsafe { libc::getppid() } != parent {
        unsafe { libc::_exit(137) }
    }
    Ok(())
}

type SpawnJob = (Command, mpsc::SyncSender<io::Result<Child>>);

/// Spawns `cmd` from a thread that lives until the process exits, so that the
/// parent-death signal only fires when the whole test process goes away.
pub(crate) fn spawn_from_process_thread(mut cmd: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<mpsc::Sender<SpawnJob>> = OnceLock::new();
    let sender = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnJob>();
        std::thread::Builder::new()
            .name("ckpt-testcluster-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("spawning the process-spawner thread");
        tx
    });
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: die_with_parent only makes async-signal-safe calls.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || die_with_parent(parent));
    }
    let (reply_tx, reply_rx) = mpsc::sync_channel(1);
    sender
        .send((cmd, reply_tx))
        .map_err(|_| io::Error::other("the process-spawner thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| io::Error::other("the process-spawner thread is gone"))?
}

/// A long-running control-plane process whose stdout and stderr go to a log file.
#[derive(Debug)]
pub(crate) struct ManagedProcess {
    pub(crate) name: String,
    pub(crate) log: PathBuf,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, std::ffi::OsString)>,
    child: Child,
}

fn start(
    program: &Path,
    args: &[String],
    log: &Path,
    append: bool,
    env: &[(String, std::ffi::OsString)],
) -> Result<Child> {
    let out = File::options()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(log)
        .map_err(|e| Error::io(log, e))?;
    let err = out.try_clone().map_err(|e| Error::io(log, e))?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err));
    if let Some(dir) = log.parent() {
        cmd.current_dir(dir);
    }
    spawn_from_process_thread(cmd).map_err(|source| Error::Spawn {
        program: program.display().to_string(),
        source,
    })
}

impl ManagedProcess {
    /// Starts `program args…` with both output streams written to `log`.
    pub(crate) fn spawn(name: &str, program: &Path, args: &[String], log: PathBuf) -> Result<Self> {
        Self::spawn_env(name, program, args, log, &[])
    }

    /// Like [`ManagedProcess::spawn`], with `env` added to the environment.
    pub(crate) fn spawn_env(
        name: &str,
        program: &Path,
        args: &[String],
        log: PathBuf,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Result<Self> {
        let env: Vec<(String, std::ffi::OsString)> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let child = start(program, args, &log, false, &env)?;
        Ok(ManagedProcess {
            name: name.to_string(),
            log,
            program: program.to_owned(),
            args: args.to_vec(),
            env,
            child,
        })
    }

    /// Starts the process again with the same arguments, its output appended to
    /// the same log, once it has stopped ([`ManagedProcess::stop`]).
    pub(crate) fn respawn(&mut self) -> Result<()> {
        if let Ok(None) = self.child.try_wait() {
            return Err(Error::Spawn {
                program: self.name.clone(),
                source: io::Error::other("it is still running"),
            });
        }
        self.child = start(&self.program, &self.args, &self.log, true, &self.env)?;
        Ok(())
    }

    /// The process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Ok` while the process runs; an error with its log tail once it exited.
    pub(crate) fn check_running(&mut self, doing: &str) -> Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(Error::Exited {
                component: self.name.clone(),
                status: status.to_string(),
                doing: doing.to_string(),
                log: self.log.clone(),
                tail: log_tail(&self.log, 30),
            }),
            Err(e) => Err(Error::Spawn {
                program: self.name.clone(),
                source: e,
            }),
        }
    }

    /// SIGTERM, then SIGKILL once `grace` has passed; reaps the process.
    /// Returns how long it took and whether SIGKILL was needed.
    pub(crate) fn stop(&mut self, grace: Duration) -> (Duration, bool) {
        let start = Instant::now();
        if let Ok(Some(_)) = self.child.try_wait() {
            return (start.elapsed(), false);
        }
        signal(self.child.id(), libc::SIGTERM);
        while start.elapsed() < grace {
            if let Ok(Some(_)) = self.child.try_wait() {
                return (start.elapsed(), false);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        (start.elapsed(), true)
    }
}

/// Sends `sig` to `pid`, ignoring errors (the process may be gone already).
pub(crate) fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill only reads its integer arguments.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// The last `lines` lines of a log file (lossy UTF-8), for error messages.
pub(crate) fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            let from = all.len().saturating_sub(lines);
            all[from..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// File in a harness temp dir naming the pid of the process that owns it.
pub(crate) const OWNER_FILE: &str = "owner.pid";
/// File in a harness temp dir that was kept on purpose (`CKPT_KEEP_CLUSTER=1`).
pub(crate) const KEPT_FILE: &str = "KEPT";

/// Creates a temp dir `PREFIX*` owned by this process, after removing those
/// of earlier test processes that died without cleaning up (an abort or
/// SIGKILL runs no `Drop`; an etcd data dir alone holds a 64 MB WAL).
pub(crate) fn owned_tempdir(prefix: &str) -> Result<tempfile::TempDir> {
    owned_tempdir_with(prefix, |_| {})
}

/// [`owned_tempdir`], calling `cleanup` on each stale dir before removing it
/// (a node's dir needs its containers killed and its mounts removed first).
pub(crate) fn owned_tempdir_with(
    prefix: &str,
    cleanup: impl Fn(&Path),
) -> Result<tempfile::TempDir> {
    let tmp = std::env::temp_dir();
    if let Ok(entries) = std::fs::read_dir(&tmp) {
        for e in entries.flatten() {
            let path = e.path();
            let stale = e.file_name().to_string_lossy().starts_with(prefix)
                && !path.join(KEPT_FILE).exists()
                && std::fs::read_to_string(path.join(OWNER_FILE))
                    .ok()
                    .and_then(|pid| pid.trim().parse::<u32>().ok())
                    .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists());
            if stale {
                cleanup(&path);
                let _ = std::fs::remove_dir_all(&path);
            }
        }
    }
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .map_err(|e| Error::io(&tmp, e))?;
    let owner = dir.path().join(OWNER_FILE);
    std::fs::write(&owner, std::process::id().to_string()).map_err(|e| Error::io(&owner, e))?;
    Ok(dir)
}

/// Removes a harness temp dir, or keeps it (marked [`KEPT_FILE`]) when asked to.
pub(crate) fn close_tempdir(t: tempfile::TempDir, keep: bool) {
    if keep {
        let _ = std::fs::write(t.path().join(KEPT_FILE), b"");
        let path = t.keep();
        eprintln!("ckpt-testcluster: kept {}", path.display());
    } else {
        let path = t.path().to_owned();
        if let Err(e) = t.close() {
            eprintln!("ckpt-testcluster: removing {}: {e}", path.display());
        }
    }
}
