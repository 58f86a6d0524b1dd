//! Test DSL: a fresh work directory per test, synthetic checkpoints, and a command
//! runner that asserts exit codes and messages.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[cfg(feature = "failpoints")]
use std::process::{Child, Stdio};
use std::process::{Command, Output};

use ckpt_convert::synthetic::{self, ModelShape};

/// A fresh temporary directory, removed on drop.
pub struct Workdir {
    dir: tempfile::TempDir,
}

impl Workdir {
    pub fn new() -> Workdir {
        Workdir {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Writes a synthetic HF checkpoint of `shape` at `rel` (sharded at `max_shard`).
    pub fn hf(&self, rel: &str, shape: &ModelShape, max_shard: u64) -> PathBuf {
        let p = self.path(rel);
        synthetic::write_hf(&p, shape, 11, max_shard).expect("write synthetic checkpoint");
        p
    }

    /// Every file under `rel` with its digest, to prove a source was not touched.
    pub fn snapshot(&self, rel: &str) -> BTreeMap<PathBuf, (u64, String)> {
        self.snapshot_of(&self.path(rel))
    }

    /// Every file under an absolute directory with its digest.
    pub fn snapshot_of(&self, dir: &Path) -> BTreeMap<PathBuf, (u64, String)> {
        files_under(dir)
            .into_iter()
            .map(|p| {
                let bytes = std::fs::read(&p).unwrap();
                let id = (
                    bytes.len() as u64,
                    ckpt_convert::formats::digest::hex(&bytes),
                );
                (p, id)
            })
            .collect()
    }

    /// Names directly under `rel`.
    pub fn ls(&self, rel: &str) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.path(rel))
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
}

/// Every file under `dir`, at any depth.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
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

/// The binary under test.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ckpt-convert"))
}

/// The result of running the binary.
pub struct Run {
    pub out: Output,
}

impl Run {
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.stdout).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.out.stderr).into_owned()
    }

    pub fn code(&self) -> i32 {
        self.out.status.code().unwrap_or(-1)
    }

    #[track_caller]
    pub fn assert_exit(&self, code: i32) -> &Self {
        assert_eq!(
            self.code(),
            code,
            "expected exit {code}, got {}\nstdout:\n{}\nstderr:\n{}",
            self.code(),
            self.stdout(),
            self.stderr()
        );
        self
    }

    #[track_caller]
    pub fn stderr_has(&self, needle: &str) -> &Self {
        assert!(
            self.stderr().contains(needle),
            "stderr lacks {needle:?}:\n{}",
            self.stderr()
        );
        self
    }

    #[track_caller]
    pub fn stdout_has(&self, needle: &str) -> &Self {
        assert!(
            self.stdout().contains(needle),
            "stdout lacks {needle:?}:\n{}",
            self.stdout()
        );
        self
    }
}

/// Runs `ckpt-convert` with `args`.
pub fn run<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Run {
    let out = bin().args(args).output().expect("run ckpt-convert");
    Run { out }
}

/// `key=path` argument.
pub fn kv(key: &str, p: &Path) -> String {
    format!("{key}={}", p.display())
}

/// The Megatron-Bridge 0.3.1 references: what the real Bridge wrote on CPU
/// (imports, exports, LoRA checkpoints and its own merges; layout in
/// `e2e/bridge/BRIDGE_NOTES.md`), from `$CKPT_BRIDGE_REFS`.
#[track_caller]
pub fn bridge_refs() -> PathBuf {
    let dir = std::env::var_os("CKPT_BRIDGE_REFS")
        .map(PathBuf::from)
        .filter(|d| d.join(".complete").is_file());
    dir.unwrap_or_else(|| {
        panic!(
            "these tests compare with what Megatron-Bridge itself writes: set CKPT_BRIDGE_REFS to the \
             references directory (./run-tests.sh makes it; by hand: e2e/bridge/refs.sh \
             <bridge venv>/bin/python, after installing e2e/bridge/requirements.txt into a venv)"
        )
    })
}

/// Every tensor of a Megatron iteration, as global tensors read through their
/// chunks: name → (dtype, shape, bytes).
pub fn megatron_tensors(dir: &Path) -> BTreeMap<String, (String, Vec<u64>, Vec<u8>)> {
    let m = ckpt_convert::formats::megatron::MegatronCheckpoint::open(dir)
        .expect("a Megatron iteration");
    m.tensors
        .iter()
        .map(|t| {
            let bytes = ckpt_convert::formats::source::read_box(
                &m.files,
                t,
                &vec![0; t.shape.len()],
                &t.shape,
            )
            .into_owned();
            (
                t.name.clone(),
                (t.dtype.to_string(), t.shape.clone(), bytes),
            )
        })
        .collect()
}

/// Every tensor of an HF directory: name → (dtype, shape, bytes).
pub fn hf_tensors(dir: &Path) -> BTreeMap<String, (String, Vec<u64>, Vec<u8>)> {
    let c = ckpt_convert::formats::hf::HfCheckpoint::open(dir).expect("an HF directory");
    c.tensors
        .iter()
        .map(|t| {
            let bytes = ckpt_convert::formats::source::read_box(
                &c.files,
                t,
                &vec![0; t.shape.len()],
                &t.shape,
            )
            .into_owned();
            (
                t.name.clone(),
                (t.dtype.to_string(), t.shape.clone(), bytes),
            )
        })
        .collect()
}

/// Copies a directory tree (a reference to edit).
pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        if p.is_dir() {
            copy_tree(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}

/// Runs `ckpt-convert` with `args` and `envs`, failing the test if it has not
/// ended after `secs` seconds (a guard against a hang, far above any run's time).
pub fn run_bounded<S: AsRef<std::ffi::OsStr>>(
    args: &[S],
    envs: &[(&str, &Path)],
    secs: u64,
) -> Run {
    let mut cmd = bin();
    cmd.args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("run ckpt-convert");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(std::time::Duration::from_secs(secs)) {
        Ok(out) => Run {
            out: out.expect("wait for ckpt-convert"),
        },
        Err(_) => {
            // SAFETY: a plain kill(2) of the child we started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!(
                "ckpt-convert {:?} did not end within {secs} s (a hang)",
                args.iter()
                    .map(|a| a.as_ref().to_owned())
                    .collect::<Vec<_>>()
            );
        }
    }
}

/// Makes a FIFO at `path`.
pub fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(
        unsafe { libc::mkfifo(c.as_ptr(), 0o600) },
        0,
        "mkfifo {}",
        path.display()
    );
}

/// Replaces `path` with `what` (a FIFO, or a symbolic link to a target).
pub fn replace_with(path: &Path, what: &Replacement) {
    let _ = std::fs::remove_file(path);
    match what {
        Replacement::Fifo => mkfifo(path),
        Replacement::Link(to) => std::os::unix::fs::symlink(to, path).unwrap(),
    }
}

/// What a hostile source puts where a file should be.
pub enum Replacement {
    /// A FIFO: opening it would wait for a writer forever.
    Fifo,
    /// A symbolic link (to `/dev/zero`, or to a file outside the source).
    Link(PathBuf),
}

/// `convert/hf_to_megatron` of `src` into `w`'s `out`.
pub fn to_megatron_args(w: &Workdir, src: &Path, out: &str) -> Vec<String> {
    vec![
        "run".to_owned(),
        "convert/hf_to_megatron".into(),
        kv("hf_model_id", src),
        kv("megatron_path", &w.path(out)),
    ]
}

/// `convert/megatron_to_hf` of `iter` (config and tokenizer from `hf`) into
/// `w`'s `back`.
pub fn to_hf_args(w: &Workdir, iter: &Path, hf: &Path) -> Vec<String> {
    vec![
        "run".to_owned(),
        "convert/megatron_to_hf".into(),
        kv("megatron_path", iter),
        kv("hf_model_id", hf),
        kv("hf_path", &w.path("back")),
    ]
}

/// Asserts that `name` was not written and no staging directory is left in `w`.
#[track_caller]
pub fn nothing_written(w: &Workdir, name: &str) {
    assert!(!w.path(name).exists(), "{name} was written");
    let left: Vec<String> = w
        .ls("")
        .into_iter()
        .filter(|n| n.contains("ckpt-staging"))
        .collect();
    assert!(left.is_empty(), "staging left behind: {left:?}");
}

/// A run stopped at a failpoint, waiting to be signalled or let go.
#[cfg(feature = "failpoints")]
pub struct Paused {
    child: Child,
    pause: PathBuf,
    /// Where its stdout and stderr go (files: a pipe nobody drains could block it).
    logs: (PathBuf, PathBuf),
}

#[cfg(feature = "failpoints")]
impl Paused {
    /// Starts `args` and waits until it reaches `point`.
    pub fn start(w: &Workdir, args: &[String], point: &str) -> Paused {
        Paused::start_with(w, bin(), args, point)
    }

    /// Starts `args` with `cmd` (the binary, or a wrapper of it) and waits until
    /// it reaches `point`.
    pub fn start_with(w: &Workdir, mut cmd: Command, args: &[String], point: &str) -> Paused {
        let pause = w.path("pause");
        let _ = std::fs::remove_file(&pause);
        let _ = std::fs::remove_file(pause.with_extension("go"));
        let logs = (w.path("stdout"), w.path("stderr"));
        let mut child = cmd
            .args(args)
            .env("CKPT_CONVERT_PAUSE_AT", point)
            .env("CKPT_CONVERT_PAUSE_FILE", &pause)
            .env("CKPT_TERMINATION_LOG", w.path("termination-log"))
            .stdout(Stdio::from(std::fs::File::create(&logs.0).unwrap()))
            .stderr(Stdio::from(std::fs::File::create(&logs.1).unwrap()))
            .spawn()
            .unwrap();
        // Bounded only against a hang: the run reaches the point, or ends.
        for _ in 0..60_000 {
            if pause.exists() {
                return Paused { child, pause, logs };
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "the run ended ({status}) before reaching {point}:\n{}",
                    std::fs::read_to_string(&logs.1).unwrap_or_default()
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        panic!("the run did not reach {point} within 300 s");
    }

    /// The process id of what was started (the converter, or its wrapper).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process id the converter wrote at the pause, as its PID namespace
    /// sees it.
    pub fn reported_pid(&self) -> String {
        std::fs::read_to_string(&self.pause).unwrap()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) of the child we started, which has not been reaped.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }

    /// Lets the run go on, and waits for it to end.
    pub fn resume(self) -> Run {
        std::fs::write(self.pause.with_extension("go"), b"").unwrap();
        self.finish()
    }

    /// Waits for the run to end; one that has not ended after 300 s (a signal
    /// it ignored) is killed and fails the test.
    pub fn finish(mut self) -> Run {
        for _ in 0..60_000 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Run {
                    out: std::process::Output {
                        status,
                        stdout: std::fs::read(&self.logs.0).unwrap(),
                        stderr: std::fs::read(&self.logs.1).unwrap(),
                    },
                };
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let _ = self.child.kill();
        panic!("the run did not end within 300 s of being signalled or let go");
    }
}
