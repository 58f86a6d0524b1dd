//! Test DSL: a fresh work directory per test, synthetic checkpoints, and a command
//! runner that asserts exit codes and messages.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

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
        let mut out = BTreeMap::new();
        let mut stack = vec![self.path(rel)];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    let bytes = std::fs::read(&p).unwrap();
                    out.insert(
                        p,
                        (
                            bytes.len() as u64,
                            ckpt_convert::formats::digest::hex(&bytes),
                        ),
                    );
                }
            }
        }
        out
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
