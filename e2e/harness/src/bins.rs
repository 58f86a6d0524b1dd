//! Finding the binaries: the control plane (built from Go modules by
//! `e2e/k8s/build.sh`) and the converter under test.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use crate::error::{Error, Result};

/// The control-plane programs a [`crate::ControlPlane`] needs.
pub const K8S_BINARIES: [&str; 4] = [
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kubectl",
];

/// The workspace root (two levels above this crate).
pub fn workspace_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = here.join("../..");
    root.canonicalize().unwrap_or(root)
}

/// The directory holding etcd, kube-apiserver, kube-controller-manager and
/// kubectl: `$CKPT_K8S_BIN` if set, else the last stdout line of
/// `e2e/k8s/build.sh`, which builds them on a fresh machine (about 11 minutes on
/// 2 cores; its progress goes to this process's stderr) and answers from its
/// cache afterwards. The answer is remembered for the life of the process.
pub fn k8s_bin_dir() -> Result<PathBuf> {
    static CACHED: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut cached = CACHED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(dir) = cached.as_ref() {
        return Ok(dir.clone());
    }
    let dir = match std::env::var_os("CKPT_K8S_BIN") {
        Some(dir) => PathBuf::from(dir),
        None => run_build_script()?,
    };
    let missing: Vec<&str> = K8S_BINARIES
        .iter()
        .copied()
        .filter(|b| !is_executable(&dir.join(b)))
        .collect();
    if !missing.is_empty() {
        return Err(Error::Binaries {
            message: format!(
                "{}: missing or not executable: {} (CKPT_K8S_BIN or e2e/k8s/build.sh)",
                dir.display(),
                missing.join(", ")
            ),
        });
    }
    *cached = Some(dir.clone());
    Ok(dir)
}

fn run_build_script() -> Result<PathBuf> {
    build_script_output("e2e/k8s/build.sh")
}

/// Runs a build script of ours (its progress goes to this process's stderr) and
/// returns the last line of its stdout: where its product is.
fn build_script_output(rel: &str) -> Result<PathBuf> {
    let script = workspace_root().join(rel);
    let output = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|source| Error::Spawn {
            program: script.display().to_string(),
            source,
        })?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(Error::Binaries {
            message: format!(
                "{} failed ({}); its stderr is above, stdout:\n{stdout}",
                script.display(),
                output.status
            ),
        });
    }
    match stdout.lines().rev().find(|l| !l.trim().is_empty()) {
        Some(line) => Ok(PathBuf::from(line.trim())),
        None => Err(Error::Binaries {
            message: format!("{} printed no bin directory", script.display()),
        }),
    }
}

/// `argocd-health`, which runs an Argo CD health script with Argo CD's Lua engine
/// (gopher-lua) as Argo CD does: `$CKPT_ARGOCD_HEALTH_BIN`, else what
/// `e2e/argocd-lua/build.sh` builds and caches (a few seconds the first time; needs
/// Go). Remembered for the life of the process.
pub fn argocd_health_binary() -> Result<PathBuf> {
    static CACHED: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut cached = CACHED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(bin) = cached.as_ref() {
        return Ok(bin.clone());
    }
    let bin = match std::env::var_os("CKPT_ARGOCD_HEALTH_BIN") {
        Some(bin) => PathBuf::from(bin),
        None => build_script_output("e2e/argocd-lua/build.sh")?,
    };
    if !is_executable(&bin) {
        return Err(Error::Binaries {
            message: format!(
                "{}: missing or not executable (CKPT_ARGOCD_HEALTH_BIN or e2e/argocd-lua/build.sh, which needs Go)",
                bin.display()
            ),
        });
    }
    *cached = Some(bin.clone());
    Ok(bin)
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The converter binary under test: `$CKPT_CONVERT_BIN`, else
/// `<target dir>/release/ckpt-convert`, where the target dir is
/// `$CARGO_TARGET_DIR` (relative to the workspace root if relative) when set,
/// else the one this test executable was built into, else `<workspace>/target`.
///
/// Fails, never skips, when it is missing: the message says to run
/// `cargo build --release -p ckpt-convert`.
pub fn converter_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("CKPT_CONVERT_BIN") {
        let path = PathBuf::from(path);
        return if is_executable(&path) {
            Ok(path)
        } else {
            Err(Error::ConverterBinary {
                tried: format!("CKPT_CONVERT_BIN={}", path.display()),
            })
        };
    }
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        // Only there: another target dir could hold a stale build.
        let dir = PathBuf::from(dir);
        candidates.push(if dir.is_absolute() {
            dir
        } else {
            workspace_root().join(dir)
        });
    } else {
        // <target>/debug/deps/<test binary>, or <target>/<triple>/debug/deps/<test binary>.
        if let Ok(exe) = std::env::current_exe()
            && let Some(deps) = exe.parent()
            && deps.file_name().is_some_and(|n| n == "deps")
            && let Some(profile_dir) = deps.parent()
            && let Some(target) = profile_dir.parent()
        {
            candidates.push(target.to_path_buf());
        }
        candidates.push(workspace_root().join("target"));
    }
    let mut tried = Vec::new();
    for dir in candidates {
        let path = dir.join("release/ckpt-convert");
        if is_executable(&path) {
            return Ok(path);
        }
        if !tried.contains(&path) {
            tried.push(path);
        }
    }
    Err(Error::ConverterBinary {
        tried: tried
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    })
}
