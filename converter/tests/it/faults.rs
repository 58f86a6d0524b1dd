//! Faults during a conversion (issue 11) leave nothing half-done: SIGTERM and
//! SIGKILL at every stage, a source truncated or rewritten while it is read,
//! ENOSPC on a real small filesystem, targets that may not be written, and the
//! cleanup of what killed runs leave. Runs stop at a stage through the
//! `failpoints` feature's pause, so a signal lands exactly there.

use std::path::Path;
#[cfg(feature = "failpoints")]
use std::path::PathBuf;
use std::process::Command;

use ckpt_convert::synthetic::ModelShape;

#[cfg(feature = "failpoints")]
use crate::util::Paused;
use crate::util::{Run, Workdir, bin, kv, run};

fn to_megatron(src: &Path, out: &Path) -> Vec<String> {
    vec![
        "run".to_owned(),
        "convert/hf_to_megatron".into(),
        kv("hf_model_id", src),
        kv("megatron_path", out),
        "--threads".into(),
        "1".into(),
    ]
}

/// Names in `dir` that a run leaves only while it works.
#[cfg(feature = "failpoints")]
fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains(".ckpt-"))
                .collect()
        })
        .unwrap_or_default()
}

/// SIGTERM (and SIGINT) mid-write: the run removes its staging directory and
/// the run directory it created, exits 128 + the signal, and says so in the
/// termination message.
#[cfg(feature = "failpoints")]
#[test]
fn sigterm_mid_write_removes_staging_and_reports() {
    for (sig, code, name) in [
        (libc::SIGTERM, 143, "SIGTERM"),
        (libc::SIGINT, 130, "SIGINT"),
    ] {
        let w = Workdir::new();
        let src = w.hf("src", &ModelShape::tiny_llama(), 60_000);
        let before = w.snapshot("src");
        let p = Paused::start(&w, &to_megatron(&src, &w.path("run")), "pieces:3");
        assert_eq!(
            leftovers(&w.path("run")).len(),
            1,
            "no staging while writing"
        );
        p.signal(sig);
        let r = p.finish();
        r.assert_exit(code)
            .stderr_has(&format!("interrupted by {name}"));
        assert!(!w.path("run").exists(), "{:?}", w.ls("run"));
        assert_eq!(before, w.snapshot("src"), "the source changed");
        let summary: ckpt_wire::Summary =
            serde_json::from_slice(&std::fs::read(w.path("termination-log")).unwrap()).unwrap();
        assert_eq!(
            (summary.status.as_str(), summary.exit_code),
            ("failed", Some(code))
        );
    }
}

/// Bytes that read back other than written (a disk or filesystem fault,
/// simulated by changing one byte of a tensor's data once every file is written,
/// before the run reads them back) fail the run, exit 1, naming the file and the
/// tensor; nothing is published and what the run created goes.
#[cfg(feature = "failpoints")]
#[test]
fn bytes_that_read_back_other_than_written_fail_the_run() {
    use std::os::unix::fs::FileExt;
    let w = Workdir::new();
    let src = w.hf("src", &ModelShape::tiny_llama(), 60_000);
    let before = w.snapshot("src");
    let p = Paused::start(&w, &to_megatron(&src, &w.path("run")), "written");
    let file = crate::util::files_under(&w.path("run"))
        .into_iter()
        .filter(|f| f.extension().is_some_and(|e| e == "distcp"))
        .max_by_key(|f| std::fs::metadata(f).unwrap().len())
        .expect("a .distcp file written");
    // In the middle of the largest file: a tensor's data (the size kept).
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&file)
        .unwrap();
    let at = f.metadata().unwrap().len() / 2;
    let mut byte = [0u8];
    f.read_exact_at(&mut byte, at).unwrap();
    f.write_all_at(&[byte[0] ^ 0x40], at).unwrap();
    drop(f);
    let r = p.resume();
    r.assert_exit(1)
        .stderr_has(&format!("{}: tensor \"", file.display()))
        .stderr_has(" read back with xxh3 ")
        .stderr_has(", written with xxh3 ");
    assert!(!w.path("run").exists(), "{:?}", w.ls("run"));
    assert_eq!(before, w.snapshot("src"), "the source changed");
}

/// As PID 1 of a container (here: of a new PID namespace), where the kernel
/// drops signals whose disposition is the default, SIGTERM still ends the run,
/// cleanly.
#[cfg(feature = "failpoints")]
#[test]
fn sigterm_as_pid_1_removes_staging() {
    let w = Workdir::new();
    let src = w.hf("src", &ModelShape::tiny_llama(), 60_000);
    let mut unshare = Command::new("unshare");
    unshare
        .args(["--pid", "--fork", "--kill-child"])
        .arg(env!("CARGO_BIN_EXE_ckpt-convert"));
    let p = Paused::start_with(&w, unshare, &to_megatron(&src, &w.path("run")), "pieces:3");
    assert_eq!(
        p.reported_pid(),
        "1",
        "the converter is not PID 1 in its namespace"
    );
    // The converter is unshare's only child.
    let id = p.pid();
    let children = std::fs::read_to_string(format!("/proc/{id}/task/{id}/children")).unwrap();
    let pid: i32 = children.trim().parse().unwrap();
    // SAFETY: kill(2) of the converter, a child of our child, still running.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    p.finish()
        .assert_exit(143)
        .stderr_has("interrupted by SIGTERM");
    assert!(!w.path("run").exists(), "{:?}", w.ls("run"));
}

/// SIGKILL at every stage: no target ever looks complete before the rename; a
/// later `ckpt-convert clean` (or the next run) removes exactly what the dead run
/// left, and the next run succeeds (or, killed after the rename, finds the
/// output done and completes the run directory's tracker).
#[cfg(feature = "failpoints")]
#[test]
fn sigkill_at_every_stage_is_recovered() {
    for point in [
        "staged",
        "pieces:3",
        "written",
        "executed",
        "validated",
        "committed",
    ] {
        let w = Workdir::new();
        let src = w.hf("src", &ModelShape::tiny_llama(), 60_000);
        let before = w.snapshot("src");
        let args = to_megatron(&src, &w.path("run"));
        let p = Paused::start(&w, &args, point);
        p.signal(libc::SIGKILL);
        p.finish();
        let iter = w.path("run/iter_0000000");
        if point == "committed" {
            assert!(iter.join("ckpt-manifest.json").is_file(), "{point}");
        } else {
            assert!(!iter.exists(), "{point}: a target exists before the rename");
            assert_eq!(leftovers(&w.path("run")).len(), 1, "{point}");
        }
        assert!(!w.path("run/latest_checkpointed_iteration.txt").exists());
        // `clean` removes the dead run's staging, and only that.
        let c = run(&["clean".to_owned(), w.path("run").display().to_string()]);
        c.assert_exit(0);
        assert!(
            leftovers(&w.path("run")).is_empty(),
            "{point}: {}",
            c.stdout()
        );
        if point == "committed" {
            assert!(
                iter.join("ckpt-manifest.json").is_file(),
                "clean removed an output"
            );
        }
        let again = run(&[&args[..], &["--json".to_owned()]].concat());
        again.assert_exit(0);
        let report: serde_json::Value = serde_json::from_str(&again.stdout()).unwrap();
        assert_eq!(
            report["reused"] == true,
            point == "committed",
            "{point}: {report}"
        );
        assert_eq!(
            std::fs::read_to_string(w.path("run/latest_checkpointed_iteration.txt")).unwrap(),
            "0"
        );
        assert_eq!(before, w.snapshot("src"), "{point}: the source changed");
    }
}

/// A run killed with `--overwrite` between moving the old output aside and
/// renaming the new one in: `clean` puts the old output back.
#[cfg(feature = "failpoints")]
#[test]
fn sigkill_inside_an_overwrite_restores_the_old_output() {
    let w = Workdir::new();
    let src = w.hf("src", &ModelShape::tiny_llama(), 60_000);
    let args = to_megatron(&src, &w.path("run"));
    run(&args).assert_exit(0);
    let iter = w.path("run/iter_0000000");
    let old = w.snapshot("run/iter_0000000");
    let mut again = args.clone();
    again.extend(["dtype=float32".to_owned(), "--overwrite".into()]);
    let p = Paused::start(&w, &again, "commit:aside");
    assert!(!iter.exists(), "the old output is not aside");
    p.signal(libc::SIGKILL);
    p.finish();
    let c = run(&["clean".to_owned(), iter.display().to_string()]);
    c.assert_exit(0).stdout_has("restored");
    assert_eq!(
        old,
        w.snapshot("run/iter_0000000"),
        "the old output changed"
    );
    assert!(leftovers(&w.path("run")).is_empty(), "{}", c.stdout());
    // Killed after the new one is in place but before the old one is gone:
    // the old one is removed, the new one stays.
    let p = Paused::start(&w, &again, "committed");
    p.signal(libc::SIGKILL);
    p.finish();
    let new = w.snapshot("run/iter_0000000");
    assert_ne!(old, new);
    run(&["clean".to_owned(), w.path("run").display().to_string()]).assert_exit(0);
    assert_eq!(new, w.snapshot("run/iter_0000000"));
    assert!(leftovers(&w.path("run")).is_empty());
}

/// `clean` of a path that is not there is a bad invocation.
#[test]
fn clean_of_nothing_is_refused() {
    let w = Workdir::new();
    run(&["clean".to_owned(), w.path("a/b").display().to_string()])
        .assert_exit(2)
        .stderr_has("a/b");
    run(&["clean".to_owned(), w.path("a").display().to_string()])
        .assert_exit(0)
        .stdout_has("nothing to clean");
}

/// `clean` and a second run never touch a live run's staging directory.
#[cfg(feature = "failpoints")]
#[test]
fn a_live_runs_staging_is_never_cleaned() {
    let w = Workdir::new();
    let src = w.hf("src", &ModelShape::tiny_llama(), 60_000);
    let args = to_megatron(&src, &w.path("run"));
    let p = Paused::start(&w, &args, "pieces:3");
    // Left in place, and not clean yet: exit 1.
    let c = run(&["clean".to_owned(), w.path("run").display().to_string()]);
    c.assert_exit(1)
        .stdout_has("is writing it")
        .stderr_has("1 left in place");
    assert_eq!(leftovers(&w.path("run")).len(), 1);
    // Another conversion into the same run directory (another iteration) works
    // beside it and leaves it alone.
    let mut other = to_megatron(&src, &w.path("run/iter_0000007"));
    other.push("dtype=float32".into());
    run(&other).assert_exit(0);
    assert_eq!(leftovers(&w.path("run")).len(), 1);
    p.resume().assert_exit(0);
    assert!(w.path("run/iter_0000000/ckpt-manifest.json").is_file());
    assert!(leftovers(&w.path("run")).is_empty());
}

/// A source truncated while it is read (the mapped bytes vanish: SIGBUS), or
/// rewritten in place (its identity changes): exit 1, nothing published, no
/// staging left, and the message names the problem.
#[cfg(feature = "failpoints")]
#[test]
fn a_source_changed_while_read_fails_the_run() {
    let shards = |src: &Path| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(src)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        v.sort();
        v
    };
    // Truncated: every shard cut to its header, so the next tensor read faults.
    let w = Workdir::new();
    let src = w.hf("src", &ModelShape::tiny_llama(), 60_000);
    let p = Paused::start(&w, &to_megatron(&src, &w.path("run")), "pieces:1");
    for s in shards(&src) {
        let bytes = std::fs::read(&s).unwrap();
        let header = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap());
        std::fs::OpenOptions::new()
            .write(true)
            .open(&s)
            .unwrap()
            .set_len(header)
            .unwrap();
    }
    p.resume()
        .assert_exit(1)
        .stderr_has("truncated or became unreadable while the conversion read it");
    assert!(!w.path("run").exists(), "{:?}", w.ls("run"));
    // Rewritten in place, same size: caught before publishing.
    let w = Workdir::new();
    let src = w.hf("src", &ModelShape::tiny_llama(), 60_000);
    let p = Paused::start(&w, &to_megatron(&src, &w.path("run")), "pieces:1");
    let last = shards(&src).pop().unwrap();
    let mut bytes = std::fs::read(&last).unwrap();
    let n = bytes.len();
    bytes[n - 64..].iter_mut().for_each(|b| *b ^= 0x5a);
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().write(true).open(&last).unwrap();
        f.write_all(&bytes).unwrap();
    }
    p.resume()
        .assert_exit(1)
        .stderr_has(&last.file_name().unwrap().to_string_lossy())
        .stderr_has("was rewritten")
        .stderr_has("nothing was published");
    assert!(!w.path("run").exists(), "{:?}", w.ls("run"));
}

/// Runs `ckpt-convert args` with `mnt` a fresh tmpfs of `size` bytes (read-only
/// when `ro`) in a private mount namespace; returns the run and the paths left
/// on the filesystem afterwards (read before the namespace goes). Needs the
/// privilege to make mount namespaces (root, or CAP_SYS_ADMIN).
fn on_tmpfs(w: &Workdir, mnt: &Path, size: u64, ro: bool, args: &[String]) -> (Run, Vec<String>) {
    use std::ffi::CString;
    use std::os::unix::process::CommandExt;
    std::fs::create_dir_all(mnt).unwrap();
    let listing = w.path("tmpfs-listing");
    let script = "\"$0\" \"$@\"; rc=$?; (cd \"$CKPT_MNT\" && find . -mindepth 1 | sort) > \"$CKPT_LISTING\"; exit $rc";
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_ckpt-convert"))
        .args(args)
        .env("CKPT_MNT", mnt)
        .env("CKPT_LISTING", &listing);
    let target = CString::new(mnt.as_os_str().as_encoded_bytes()).unwrap();
    let fstype = CString::new("tmpfs").unwrap();
    let data = CString::new(format!("size={size}")).unwrap();
    let root = CString::new("/").unwrap();
    let flags = if ro { libc::MS_RDONLY } else { 0 };
    // SAFETY: between fork and exec the closure makes only system calls on
    // memory prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::unshare(libc::CLONE_NEWNS) != 0
                || libc::mount(
                    std::ptr::null(),
                    root.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) != 0
                || libc::mount(
                    fstype.as_ptr(),
                    target.as_ptr(),
                    fstype.as_ptr(),
                    flags,
                    data.as_ptr().cast(),
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().unwrap_or_else(|e| {
        panic!(
            "cannot mount a test filesystem ({e}): these tests need a mount namespace (run as root, or with CAP_SYS_ADMIN)"
        )
    });
    let left = std::fs::read_to_string(&listing)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect();
    (Run { out }, left)
}

/// ENOSPC mid-write on a real filesystem too small for the output: exit 1
/// naming the file and the error, and nothing left on it (no staging, no run
/// directory).
#[test]
fn enospc_mid_write_leaves_nothing() {
    let w = Workdir::new();
    let src = w.hf("src", &ModelShape::tiny_llama(), 60_000);
    let mnt = w.path("small");
    let (r, left) = on_tmpfs(
        &w,
        &mnt,
        96 << 10,
        false,
        &to_megatron(&src, &mnt.join("run")),
    );
    r.assert_exit(1).stderr_has("No space left on device");
    assert!(left.is_empty(), "left on the filesystem: {left:?}");
}

/// A target on a read-only filesystem, or in a directory the run may not write:
/// exit 2 (nothing was written), naming the directory and the reason.
#[test]
fn unwritable_targets_are_refused_with_exit_2() {
    let w = Workdir::new();
    let src = w.hf("src", &ModelShape::tiny_llama(), 1 << 30);
    let mnt = w.path("ro");
    let (r, left) = on_tmpfs(
        &w,
        &mnt,
        1 << 20,
        true,
        &to_megatron(&src, &mnt.join("run")),
    );
    r.assert_exit(2)
        .stderr_has(&mnt.display().to_string())
        .stderr_has("read-only file system");
    assert!(left.is_empty(), "{left:?}");
    // Permission denied: a directory without write permission, for a process
    // without the capability to override it (root drops it for this run).
    let locked = w.path("locked");
    std::fs::create_dir(&locked).unwrap();
    std::fs::set_permissions(&locked, std::os::unix::fs::PermissionsExt::from_mode(0o555)).unwrap();
    let mut cmd = bin();
    cmd.args(to_megatron(&src, &locked.join("run")));
    // SAFETY: prctl(2) only, between fork and exec.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            for cap in [1, 2, 3] {
                // CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER; an
                // unprivileged process has none to drop and fails harmlessly.
                libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0);
            }
            Ok(())
        });
    }
    let r = Run {
        out: cmd.output().unwrap(),
    };
    r.assert_exit(2)
        .stderr_has(&locked.display().to_string())
        .stderr_has("permission denied");
    assert_eq!(std::fs::read_dir(&locked).unwrap().count(), 0);
}

/// A source that does not exist is a refusal (exit 2) saying so.
#[test]
fn a_missing_source_is_refused_with_exit_2() {
    let w = Workdir::new();
    run(&to_megatron(&w.path("nope"), &w.path("run")))
        .assert_exit(2)
        .stderr_has("nope")
        .stderr_has("does not exist");
    run(&[
        "run".to_owned(),
        "convert/megatron_to_hf".into(),
        kv("megatron_path", &w.path("nope/iter_0000001")),
        kv("hf_path", &w.path("hf")),
        "mapping=identity".into(),
    ])
    .assert_exit(2)
    .stderr_has("iter_0000001")
    .stderr_has("does not exist");
    assert!(!w.path("run").exists() && !w.path("hf").exists());
}

/// `hf_to_megatron` into an existing directory that is not a Megatron run
/// directory is refused naming it, and writes nothing there.
#[test]
fn a_megatron_path_holding_other_files_is_refused() {
    let w = Workdir::new();
    let src = w.hf("src", &ModelShape::tiny_llama(), 1 << 30);
    std::fs::create_dir(w.path("data")).unwrap();
    std::fs::write(w.path("data/notes.txt"), b"mine").unwrap();
    run(&to_megatron(&src, &w.path("data")))
        .assert_exit(2)
        .stderr_has("megatron_path=")
        .stderr_has("is not a Megatron run directory: it holds notes.txt");
    assert_eq!(w.ls("data"), vec!["notes.txt"]);
}

/// An identical re-run is done: exit 0, nothing rewritten (same inodes and
/// times), and the termination summary says `reused`.
#[test]
fn an_identical_rerun_is_recognised_as_done() {
    use std::os::unix::fs::MetadataExt;
    let w = Workdir::new();
    let src = w.hf("src", &ModelShape::tiny_llama(), 60_000);
    let args = to_megatron(&src, &w.path("run"));
    run(&args).assert_exit(0);
    let stamp = |dir: &Path| -> Vec<(String, u64, i64, i64)> {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let m = e.metadata().unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    m.ino(),
                    m.mtime_nsec(),
                    m.ctime_nsec(),
                )
            })
            .collect();
        v.sort();
        v
    };
    let before = (stamp(&w.path("run")), stamp(&w.path("run/iter_0000000")));
    let log = w.path("termination-log");
    let out = bin()
        .args(&args)
        .env("CKPT_TERMINATION_LOG", &log)
        .output()
        .unwrap();
    Run { out }.assert_exit(0).stdout_has("reused");
    assert_eq!(
        before,
        (stamp(&w.path("run")), stamp(&w.path("run/iter_0000000"))),
        "something was rewritten"
    );
    let summary: ckpt_wire::Summary =
        serde_json::from_slice(&std::fs::read(&log).unwrap()).unwrap();
    assert!(
        summary.reused && summary.status == "succeeded",
        "{summary:?}"
    );
    assert!(summary.checks_passed.is_some_and(|n| n > 0), "{summary:?}");
    // A changed source is not the same conversion: refused, not reused.
    std::fs::write(src.join("tokenizer_config.json"), "{}\n").unwrap();
    run(&args)
        .assert_exit(2)
        .stderr_has("already holds the output of another conversion");
}

#[cfg(not(feature = "failpoints"))]
#[test]
fn bytes_that_read_back_other_than_written_fail_the_run() {
    panic!(
        "this test needs the failpoints feature: cargo test --features failpoints (the repository's test command passes it)"
    );
}

#[cfg(not(feature = "failpoints"))]
#[test]
fn sigterm_mid_write_removes_staging_and_reports() {
    panic!(
        "the signal tests need the failpoints feature: cargo test --features failpoints (the repository's test command passes it)"
    );
}
