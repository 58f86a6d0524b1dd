//! Leaving nothing behind. Containers outlive containerd and the kubelet (each
//! runs under a daemonized `containerd-shim-runc-v2`), so stopping the node's
//! processes is not enough: this kills every process in the node's cgroup
//! subtree and every process started with the node's directory on its command
//! line, unmounts everything under the directory (container root filesystems,
//! network namespaces), deletes the pod bridge and the cgroups, and restores
//! the kernel settings the kubelet changed. It works from the directory alone,
//! so it also cleans up after a test process that was killed.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::config::Layout;
use crate::process::signal;

/// The sysctls the kubelet sets at start (`setupKernelTunables`), as
/// `/proc/sys` paths.
pub(crate) const KUBELET_SYSCTLS: [&str; 6] = [
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
];

/// The file in the node dir with the values before the kubelet started.
pub(crate) const SYSCTLS_FILE: &str = "sysctls-before";

/// Records the current values of [`KUBELET_SYSCTLS`] in the node dir.
pub(crate) fn save_sysctls(l: &Layout) -> std::io::Result<()> {
    let mut text = String::new();
    for key in KUBELET_SYSCTLS {
        let value = std::fs::read_to_string(Path::new("/proc/sys").join(key))?;
        text.push_str(&format!("{key}={}\n", value.trim()));
    }
    std::fs::write(l.path(SYSCTLS_FILE), text)
}

fn restore_sysctls(l: &Layout) -> Vec<String> {
    let mut problems = Vec::new();
    let Ok(text) = std::fs::read_to_string(l.path(SYSCTLS_FILE)) else {
        return problems;
    };
    for line in text.lines() {
        if let Some((key, value)) = line.split_once('=')
            && KUBELET_SYSCTLS.contains(&key)
        {
            let path = Path::new("/proc/sys").join(key);
            let now = std::fs::read_to_string(&path).unwrap_or_default();
            if now.trim() != value
                && let Err(e) = std::fs::write(&path, value)
            {
                problems.push(format!("restoring {}: {e}", path.display()));
            }
        }
    }
    problems
}

/// The mount points of the cgroup v1 hierarchies (`/sys/fs/cgroup/memory`, …).
pub(crate) fn cgroup_v1_mounts() -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fstype = right.split_whitespace().next()?;
            let mount_point = left.split_whitespace().nth(4)?;
            (fstype == "cgroup").then(|| PathBuf::from(mount_point))
        })
        .collect()
}

/// Every directory under `root` (itself included), deepest first.
fn dirs_deepest_first(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(entries) = std::fs::read_dir(&d) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
        out.push(d);
    }
    out.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    out
}

/// The pids in the node's cgroup subtree, from every hierarchy.
pub(crate) fn cgroup_pids(l: &Layout) -> Vec<u32> {
    let mut pids = Vec::new();
    for mount in cgroup_v1_mounts() {
        let root = mount.join(l.cgroup_root.trim_start_matches('/'));
        for d in dirs_deepest_first(&root) {
            if let Ok(text) = std::fs::read_to_string(d.join("cgroup.procs")) {
                pids.extend(text.lines().filter_map(|p| p.trim().parse::<u32>().ok()));
            }
        }
    }
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Pids (other than this process) whose command line mentions the node dir:
/// containerd, the kubelet and the shims, whose `-address` is under it.
pub(crate) fn processes_mentioning(dir: &Path) -> Vec<u32> {
    let me = std::process::id();
    // With the trailing slash, so that another node's dir sharing a prefix never matches.
    let mut needle = dir.as_os_str().as_encoded_bytes().to_vec();
    needle.push(b'/');
    let mut pids = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        if let Ok(cmdline) = std::fs::read(e.path().join("cmdline"))
            && cmdline
                .windows(needle.len())
                .any(|w| w == needle.as_slice())
        {
            pids.push(pid);
        }
    }
    pids
}

/// Mount points at or under `dir`, deepest first.
pub(crate) fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut out: Vec<PathBuf> = text
        .lines()
        .filter_map(|line| line.split_whitespace().nth(4))
        // mountinfo escapes spaces and other odd bytes as \ooo.
        .map(unescape_mountinfo)
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect();
    out.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    out.dedup();
    out
}

fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn umount(path: &Path) -> std::io::Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in path"))?;
    // SAFETY: umount2 only reads the NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether the bridge exists.
pub(crate) fn bridge_exists(l: &Layout) -> bool {
    Path::new("/sys/class/net").join(&l.bridge).exists()
}

/// Cgroup directories of the node that still exist.
pub(crate) fn cgroup_dirs(l: &Layout) -> Vec<PathBuf> {
    cgroup_v1_mounts()
        .into_iter()
        .map(|m| m.join(l.cgroup_root.trim_start_matches('/')))
        .filter(|p| p.exists())
        .collect()
}

/// Kills and removes everything of the node (see the module docs). Returns
/// what could not be cleaned, for a message; empty when all is gone.
pub(crate) fn sweep(l: &Layout) -> Vec<String> {
    let mut problems = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    // Containers first (their shims would otherwise report the deaths to a
    // containerd that is already gone, which is harmless but noisy), then the
    // shims and anything else started for this node.
    loop {
        let mut pids = cgroup_pids(l);
        pids.extend(processes_mentioning(&l.dir));
        if pids.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            problems.push(format!("processes still alive after SIGKILL: {pids:?}"));
            break;
        }
        for pid in pids {
            signal(pid, libc::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    loop {
        let mounts = mounts_under(&l.dir);
        if mounts.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            problems.push(format!("still mounted: {mounts:?}"));
            break;
        }
        for m in mounts {
            let _ = umount(&m);
        }
    }
    if bridge_exists(l) {
        let out = std::process::Command::new("ip")
            .args(["link", "delete", &l.bridge])
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => problems.push(format!(
                "ip link delete {}: {}",
                l.bridge,
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => problems.push(format!("ip link delete {}: {e}", l.bridge)),
        }
    }
    // A cgroup can be removed once its last task is gone, which the kernel
    // notes a moment after the kill.
    for mount in cgroup_v1_mounts() {
        let root = mount.join(l.cgroup_root.trim_start_matches('/'));
        for d in dirs_deepest_first(&root) {
            while d.exists() {
                match std::fs::remove_dir(&d) {
                    Ok(()) => break,
                    Err(e) if Instant::now() > deadline => {
                        problems.push(format!("removing cgroup {}: {e}", d.display()));
                        break;
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
    }
    problems.extend(restore_sysctls(l));
    problems
}
