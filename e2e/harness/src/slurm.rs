//! A real single-node Slurm for tests: Debian's `munge` and `slurm-wlm`
//! (`slurmctld` and `slurmd` on this host), started with a configuration, state,
//! spool and log directories, ports and a munge key and socket of their own, so
//! it touches nothing global and several can run side by side. Clients find it
//! through `SLURM_CONF` ([`Slurm::env`]); jobs run as the user who submits them.
//!
//! Accounting is off (no `slurmdbd`): `sacct` says so, and a finished job's state
//! comes from `scontrol` for `MinJobAge` seconds after it ended.
//!
//! ```no_run
//! # fn demo() -> ckpt_testcluster::Result<()> {
//! let slurm = ckpt_testcluster::Slurm::shared()?; // one per test binary, stopped at exit
//! let out = slurm.command("sinfo").output().unwrap();
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::process::{ManagedProcess, close_tempdir, log_tail, owned_tempdir};

/// The programs the harness runs, and the clients the converter's Slurm executor
/// uses.
pub const SLURM_PROGRAMS: [&str; 9] = [
    "munged",
    "mungekey",
    "slurmctld",
    "slurmd",
    "sbatch",
    "squeue",
    "scontrol",
    "scancel",
    "sinfo",
];

/// The node's name in the test cluster.
pub const NODE: &str = "ckptnode";

/// How long the daemons have to come up (a loaded machine is slow).
const STARTUP: Duration = Duration::from_secs(120);

/// A running single-node Slurm cluster.
#[derive(Debug)]
pub struct Slurm {
    dir: PathBuf,
    conf: PathBuf,
    tempdir: Mutex<Option<tempfile::TempDir>>,
    processes: Mutex<Vec<ManagedProcess>>,
    keep: bool,
}

/// Where a program is: on `PATH`, or in `/usr/sbin` and `/sbin` (daemons, which a
/// non-root `PATH` often lacks).
fn find(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

fn missing_programs() -> Vec<&'static str> {
    SLURM_PROGRAMS
        .iter()
        .copied()
        .filter(|p| find(p).is_none())
        .collect()
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| Error::io(path, e))
}

impl Slurm {
    /// Starts munged, slurmctld and slurmd, and waits until the node is idle.
    ///
    /// # Errors
    /// [`Error::Binaries`] with how to install Slurm when a program is missing, or
    /// when not running as root (slurmd starts jobs as their user); a daemon's
    /// exit or a timeout with the tail of its log.
    pub fn start() -> Result<Slurm> {
        let missing = missing_programs();
        if !missing.is_empty() {
            return Err(Error::Binaries {
                message: format!(
                    "Slurm for tests: {} not found; install Debian's slurm-wlm and munge (apt-get install slurm-wlm munge; run-tests.sh does it)",
                    missing.join(", ")
                ),
            });
        }
        // SAFETY: geteuid only reads the process's credentials.
        if unsafe { libc::geteuid() } != 0 {
            return Err(Error::Binaries {
                message: "Slurm for tests: slurmd starts jobs as their submitting user and must run as root; run the tests as root (as CI does)".into(),
            });
        }
        let mut attempt = 1;
        loop {
            match Self::start_once() {
                Err(e) if attempt < crate::control_plane::PORT_ATTEMPTS && e.address_in_use() => {
                    eprintln!(
                        "ckpt-testcluster: a Slurm port was taken before its daemon bound it (attempt {attempt}); starting again on new ports: {e}"
                    );
                    attempt += 1;
                }
                r => return r,
            }
        }
    }

    fn start_once() -> Result<Slurm> {
        let tempdir = owned_tempdir("ckpt-slurm-")?;
        let dir = tempdir.path().to_path_buf();
        // munged refuses a socket whose directories others cannot search.
        set_mode(&dir, 0o755)?;
        let sub = |name: &str, mode: u32| -> Result<PathBuf> {
            let p = dir.join(name);
            std::fs::create_dir_all(&p).map_err(|e| Error::io(&p, e))?;
            set_mode(&p, mode)?;
            Ok(p)
        };
        let etc = sub("etc", 0o755)?;
        let secret = sub("munge", 0o700)?;
        let run = sub("run", 0o755)?;
        let log = sub("log", 0o755)?;
        let state = sub("state", 0o700)?;
        let spool = sub("spool", 0o755)?;
        let mut slurm = Slurm {
            conf: etc.join("slurm.conf"),
            dir: dir.clone(),
            tempdir: Mutex::new(Some(tempdir)),
            processes: Mutex::new(Vec::new()),
            keep: std::env::var_os("CKPT_KEEP_CLUSTER").is_some_and(|v| v == "1"),
        };
        let key = secret.join("munge.key");
        let out = Command::new(find("mungekey").expect("checked"))
            .args(["--create", "--bits=1024", "--keyfile"])
            .arg(&key)
            .output()
            .map_err(|source| Error::Spawn {
                program: "mungekey".into(),
                source,
            })?;
        if !out.status.success() {
            return Err(Error::Binaries {
                message: format!("mungekey: {}", String::from_utf8_lossy(&out.stderr).trim()),
            });
        }
        let socket = run.join("munge.socket");
        slurm.spawn(
            "munged",
            &[
                "--foreground".into(),
                format!("--key-file={}", key.display()),
                format!("--socket={}", socket.display()),
                format!("--pid-file={}", run.join("munged.pid").display()),
                format!("--log-file={}", log.join("munged.log").display()),
                format!("--seed-file={}", secret.join("munged.seed").display()),
            ],
        )?;
        slurm.wait_for("munged's socket", "munged", || socket.exists())?;
        let [ctld_port, node_port] = crate::control_plane::free_ports::<2>()?;
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let host = hostname();
        let conf = format!(
            "# A single-node Slurm for ckpt tests; nothing here is shared with the host's.\n\
             ClusterName=ckpt{pid}\n\
             SlurmctldHost=localhost(127.0.0.1)\n\
             SlurmctldPort={ctld_port}\n\
             SlurmdPort={node_port}\n\
             SlurmUser=root\n\
             SlurmdUser=root\n\
             AuthType=auth/munge\n\
             CredType=cred/munge\n\
             AuthInfo=socket={socket}\n\
             StateSaveLocation={state}\n\
             SlurmdSpoolDir={spool}\n\
             SlurmctldPidFile={run}/slurmctld.pid\n\
             SlurmdPidFile={run}/slurmd.pid\n\
             SlurmctldLogFile={log}/slurmctld.log\n\
             SlurmdLogFile={log}/slurmd.log\n\
             PlugStackConfig={etc}/plugstack.conf\n\
             MailProg=/bin/true\n\
             ProctrackType=proctrack/linuxproc\n\
             TaskPlugin=task/none\n\
             JobAcctGatherType=jobacct_gather/none\n\
             AccountingStorageType=accounting_storage/none\n\
             JobCompType=jobcomp/none\n\
             MpiDefault=none\n\
             SchedulerType=sched/builtin\n\
             SelectType=select/cons_tres\n\
             SelectTypeParameters=CR_CPU\n\
             ReturnToService=2\n\
             KillWait=5\n\
             NodeName={NODE} NodeAddr=127.0.0.1 NodeHostname={host} CPUs={cpus} State=UNKNOWN\n\
             PartitionName=debug Nodes={NODE} Default=YES MaxTime=INFINITE State=UP\n",
            pid = std::process::id(),
            socket = socket.display(),
            state = state.display(),
            spool = spool.display(),
            run = run.display(),
            log = log.display(),
            etc = etc.display(),
        );
        std::fs::write(&slurm.conf, conf).map_err(|e| Error::io(&slurm.conf, e))?;
        let plugstack = etc.join("plugstack.conf");
        std::fs::write(&plugstack, "").map_err(|e| Error::io(&plugstack, e))?;
        let conf_arg = slurm.conf.display().to_string();
        slurm.spawn("slurmctld", &["-D".into(), "-f".into(), conf_arg.clone()])?;
        slurm.spawn(
            "slurmd",
            &["-D".into(), "-N".into(), NODE.into(), "-f".into(), conf_arg],
        )?;
        slurm.wait_for("the node to be idle", "slurmd", || {
            slurm
                .command("sinfo")
                .args(["-h", "-N", "-o", "%T"])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "idle")
        })?;
        Ok(slurm)
    }

    fn spawn(&mut self, name: &str, args: &[String]) -> Result<()> {
        let program = find(name).expect("checked before starting");
        let log = self.dir.join("log").join(format!("{name}.out"));
        let mut p = ManagedProcess::spawn_env(
            name,
            &program,
            args,
            log,
            &[("SLURM_CONF", self.conf.as_os_str())],
        )?;
        p.check_running(&format!("starting {name}"))?;
        self.processes
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .push(p);
        Ok(())
    }

    /// Polls `ready` until it holds, failing with `component`'s log when it exits
    /// or [`STARTUP`] passes.
    fn wait_for(&self, what: &str, component: &str, ready: impl Fn() -> bool) -> Result<()> {
        let started = Instant::now();
        loop {
            {
                let mut ps = self.processes.lock().unwrap_or_else(|p| p.into_inner());
                for p in ps.iter_mut() {
                    p.check_running(&format!("waiting for {what}"))?;
                }
            }
            if ready() {
                return Ok(());
            }
            if started.elapsed() > STARTUP {
                let log = self.dir.join("log").join(format!("{component}.log"));
                let log = if log.exists() {
                    log
                } else {
                    self.dir.join("log").join(format!("{component}.out"))
                };
                return Err(Error::Timeout {
                    what: what.into(),
                    after: STARTUP,
                    tail: log_tail(&log, 30),
                    log,
                });
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The cluster shared by every test in this process, started by the first
    /// caller; stopped at exit (running jobs cancelled first). If starting fails,
    /// every caller gets the same error.
    ///
    /// # Errors
    /// As [`Slurm::start`].
    pub fn shared() -> Result<&'static Slurm> {
        static SHARED: OnceLock<std::result::Result<Slurm, String>> = OnceLock::new();
        static STOP: OnceLock<&'static Slurm> = OnceLock::new();
        extern "C" fn stop_at_exit() {
            if let Some(s) = STOP.get() {
                let _ = std::panic::catch_unwind(|| s.stop());
            }
        }
        let r = SHARED.get_or_init(|| Slurm::start().map_err(|e| e.to_string()));
        match r {
            Ok(s) => {
                if STOP.set(s).is_ok() {
                    // SAFETY: registers a plain extern "C" function without captures.
                    unsafe {
                        libc::atexit(stop_at_exit);
                    }
                }
                Ok(s)
            }
            Err(e) => Err(Error::Shared(format!("Slurm: {e}"))),
        }
    }

    /// `slurm.conf`, for `SLURM_CONF`.
    pub fn conf(&self) -> &Path {
        &self.conf
    }

    /// The environment clients need: `SLURM_CONF`.
    pub fn env(&self) -> [(&'static str, &Path); 1] {
        [("SLURM_CONF", self.conf.as_path())]
    }

    /// `program` (a Slurm client) with [`Slurm::env`].
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new(find(program).unwrap_or_else(|| PathBuf::from(program)));
        c.envs(self.env());
        c
    }

    /// The harness's directory (configuration, state, logs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The last `lines` of a daemon's log (`slurmctld`, `slurmd`, `munged`), for
    /// failure messages.
    pub fn log_tail(&self, daemon: &str, lines: usize) -> String {
        log_tail(&self.dir.join("log").join(format!("{daemon}.log")), lines)
    }

    /// Cancels every job, stops slurmd, slurmctld and munged, and removes the
    /// temp dir unless asked to keep it. Idempotent.
    pub fn stop(&self) {
        let mut processes =
            std::mem::take(&mut *self.processes.lock().unwrap_or_else(|p| p.into_inner()));
        if !processes.is_empty() {
            // Jobs run under slurmstepd, which outlives slurmd: end them first.
            let _ = self
                .command("scancel")
                .args(["--full", "--user", "root"])
                .output();
            let until = Instant::now() + Duration::from_secs(30);
            while Instant::now() < until {
                let left = self
                    .command("squeue")
                    .args(["-h", "-o", "%i"])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
                if !matches!(left, Ok(ref s) if !s.is_empty()) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        while let Some(mut p) = processes.pop() {
            let _ = p.stop(Duration::from_secs(10));
        }
        if let Some(t) = self
            .tempdir
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            close_tempdir(t, self.keep);
        }
    }
}

impl Drop for Slurm {
    fn drop(&mut self) {
        self.stop();
    }
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "localhost".into();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}
