//! Read-only mounts, enforced by the kernel as on a real node.
//!
//! The kubelet bind-mounts a `readOnly` volume read-only, so any write fails
//! with `EROFS` ("Read-only file system"), for root too. The stand-in does the
//! same: between `fork` and `exec` the child enters a private mount namespace
//! (`unshare(CLONE_NEWNS)`; when the harness is not root, together with a user
//! namespace that maps the caller's uid/gid to 0), makes every mount private so
//! nothing leaks to the host, bind-mounts each volume's local directory at
//! `<root>/mounts/<mountPath>` (one path per mountPath, shared by the pods that
//! mount something there, each seeing its own), and remounts the read-only ones
//! with `MS_RDONLY`. The mounts exist only in that namespace and vanish with the
//! process; on the host the targets stay empty directories, so cleaning a run
//! dir can never reach into a mapped volume.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::process::die_with_parent;

/// One bind mount to set up in the child.
#[derive(Debug, Clone)]
pub(crate) struct BindMount {
    pub(crate) source: PathBuf,
    pub(crate) target: PathBuf,
    pub(crate) read_only: bool,
}

#[derive(Debug)]
struct Prepared {
    source: CString,
    target: CString,
    read_only: bool,
    /// Flags of the source mount that a remount inside a user namespace must
    /// keep (the kernel locks them).
    locked: libc::c_ulong,
}

/// Everything the child needs, computed before the fork so that the child
/// only makes system calls (no allocation after fork).
#[derive(Debug)]
pub(crate) struct Sandbox {
    parent: libc::pid_t,
    /// `(uid_map, gid_map)` contents when a user namespace is needed.
    id_maps: Option<(Vec<u8>, Vec<u8>)>,
    mounts: Vec<Prepared>,
}

fn cstring(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

fn locked_flags(path: &Path) -> io::Result<libc::c_ulong> {
    let c = cstring(path)?;
    // SAFETY: statvfs writes into the zeroed struct we own.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let pairs = [
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ];
    Ok(pairs
        .iter()
        .filter(|(st_flag, _)| st.f_flag & *st_flag != 0)
        .fold(0, |acc, (_, ms)| acc | ms))
}

/// Whether the harness runs as root (then no user namespace is needed).
pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no arguments and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

impl Sandbox {
    /// Prepares the mounts; sources and targets must exist.
    pub(crate) fn new(mounts: &[BindMount]) -> io::Result<Sandbox> {
        let id_maps = if is_root() {
            None
        } else {
            // SAFETY: getters without arguments.
            let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
            Some((
                format!("0 {uid} 1").into_bytes(),
                format!("0 {gid} 1").into_bytes(),
            ))
        };
        let mounts = mounts
            .iter()
            .map(|m| {
                Ok(Prepared {
                    source: cstring(&m.source)?,
                    target: cstring(&m.target)?,
                    read_only: m.read_only,
                    locked: locked_flags(&m.source)?,
                })
            })
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Sandbox {
            parent: std::process::id() as libc::pid_t,
            id_maps,
            mounts,
        })
    }

    /// Runs in the forked child before `exec`: parent-death signal, namespaces,
    /// bind mounts. Only async-signal-safe system calls.
    pub(crate) fn enter(&self) -> io::Result<()> {
        fn check(rc: libc::c_int) -> io::Result<()> {
            if rc == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        }
        fn write_file(path: &std::ffi::CStr, data: &[u8]) -> io::Result<()> {
            // SAFETY: open/write/close on a NUL-terminated path and a live buffer.
            unsafe {
                let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                let n = libc::write(fd, data.as_ptr().cast(), data.len());
                let err = io::Error::last_os_error();
                libc::close(fd);
                if n != data.len() as isize {
                    return Err(err);
                }
            }
            Ok(())
        }

        die_with_parent(self.parent)?;
        // SAFETY: plain system calls on pointers to NUL-terminated strings we own.
        unsafe {
            match &self.id_maps {
                Some((uid_map, gid_map)) => {
                    check(libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNS))?;
                    write_file(c"/proc/self/setgroups", b"deny")?;
                    write_file(c"/proc/self/uid_map", uid_map)?;
                    write_file(c"/proc/self/gid_map", gid_map)?;
                }
                None => check(libc::unshare(libc::CLONE_NEWNS))?,
            }
            check(libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            for m in &self.mounts {
                check(libc::mount(
                    m.source.as_ptr(),
                    m.target.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ))?;
                if m.read_only {
                    check(libc::mount(
                        std::ptr::null(),
                        m.target.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | m.locked,
                        std::ptr::null(),
                    ))?;
                }
            }
        }
        Ok(())
    }
}

/// Checks once that read-only bind mounts work here: a shell inside the
/// sandbox must fail to write into a read-only mount, and nothing may appear
/// in its source directory.
pub(crate) async fn probe(scratch: &Path) -> Result<(), String> {
    let source = scratch.join("probe-source");
    let target = scratch.join("probe-target");
    for d in [&source, &target] {
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    let sandbox = Sandbox::new(&[BindMount {
        source: source.clone(),
        target: target.clone(),
        read_only: true,
    }])
    .map_err(|e| {
        format!(
            "preparing a read-only bind mount of {}: {e}",
            source.display()
        )
    })?;
    let mut cmd = tokio::process::Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(r#"if echo x > "$0/probe"; then exit 3; fi; exit 0"#)
        .arg(&target)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    // SAFETY: Sandbox::enter only makes async-signal-safe system calls.
    unsafe {
        cmd.pre_exec(move || sandbox.enter());
    }
    let how = if is_root() {
        "a private mount namespace (unshare(CLONE_NEWNS))"
    } else {
        "an unprivileged user + mount namespace (unshare(CLONE_NEWUSER|CLONE_NEWNS)); run the tests as root or enable unprivileged user namespaces (kernel.unprivileged_userns_clone=1, user.max_user_namespaces>0)"
    };
    let out = cmd
        .output()
        .await
        .map_err(|e| format!("entering {how} failed: {e}"))?;
    let leaked = source.join("probe").exists();
    let _ = std::fs::remove_dir_all(&source);
    let _ = std::fs::remove_dir_all(&target);
    if !out.status.success() || leaked {
        return Err(format!(
            "a write into a read-only bind mount {} (exit {}, file appeared in the source: {leaked}; stderr: {})",
            if out.status.code() == Some(3) {
                "succeeded"
            } else {
                "probe failed"
            },
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn read_only_mounts_refuse_writes_and_writable_ones_accept_them() {
        let dir = tempfile::tempdir().expect("temp dir");
        probe(dir.path())
            .await
            .expect("read-only bind mounts work here");

        let (ro_src, rw_src) = (dir.path().join("ro"), dir.path().join("rw"));
        let (ro_dst, rw_dst) = (dir.path().join("ro-target"), dir.path().join("rw-target"));
        for d in [&ro_src, &rw_src, &ro_dst, &rw_dst] {
            std::fs::create_dir(d).expect("mkdir");
        }
        std::fs::write(ro_src.join("seen"), "x").expect("write");
        let sandbox = Sandbox::new(&[
            BindMount {
                source: ro_src.clone(),
                target: ro_dst.clone(),
                read_only: true,
            },
            BindMount {
                source: rw_src.clone(),
                target: rw_dst.clone(),
                read_only: false,
            },
        ])
        .expect("sandbox");
        let mut cmd = tokio::process::Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(r#"test -f "$0/seen" && ! touch "$0/new" 2>/dev/null && touch "$1/new""#)
            .arg(&ro_dst)
            .arg(&rw_dst);
        // SAFETY: Sandbox::enter only makes async-signal-safe system calls.
        unsafe {
            cmd.pre_exec(move || sandbox.enter());
        }
        let status = cmd.status().await.expect("spawn");
        assert!(status.success(), "{status}");
        assert!(!ro_src.join("new").exists() && rw_src.join("new").exists());
        // The host never sees the mounts.
        assert_eq!(std::fs::read_dir(&ro_dst).expect("read").count(), 0);
    }
}
