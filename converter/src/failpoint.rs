//! Test hooks that stop, pause or fail a run at a named point, so tests can
//! inject faults where they would otherwise be a matter of luck. They exist only
//! with the `failpoints` feature; without it every hook is an empty inline
//! function.
//!
//! Set by environment variable (read when the point is reached):
//! - `CKPT_CONVERT_ABORT_AT=POINT`: `abort()` there, as a crash would.
//! - `CKPT_CONVERT_PAUSE_AT=POINT` with `CKPT_CONVERT_PAUSE_FILE=F`: write the
//!   process id to `F` (complete when it appears), then wait until `F` with
//!   the extension `go` exists. A test sends a signal, or changes a source, and then lets the run go.
//! - `CKPT_CONVERT_FAIL_READ=NAME`: opening a source file named `NAME` fails
//!   with `EIO`.
//! - `CKPT_CONVERT_ABORT_AFTER_PIECES=N`: abort after N pieces are written.
//!
//! Points, in the order a run reaches them: `staged` (staging directory made),
//! `pieces:N` (N pieces written), `written` (every file written, not yet
//! synced or read back), `executed` (all read back, the fsync under way),
//! `read-back` (a split run's part: its files written, read back once and
//! synced, not yet read back again), `validated` (validated, about to be committed), `commit:aside` (an existing
//! target moved aside, the new one not yet in place), `committed` (renamed into
//! place, run-directory trackers not yet written).

#[cfg(feature = "failpoints")]
mod imp {
    use std::path::Path;

    fn wanted(var: &str, point: &str) -> bool {
        std::env::var(var).is_ok_and(|v| v == point)
    }

    pub fn hit(point: &str) {
        if wanted("CKPT_CONVERT_ABORT_AT", point) {
            std::process::abort();
        }
        if wanted("CKPT_CONVERT_PAUSE_AT", point)
            && let Some(file) = std::env::var_os("CKPT_CONVERT_PAUSE_FILE")
        {
            let file = std::path::PathBuf::from(file);
            let tmp = file.with_extension("tmp");
            std::fs::write(&tmp, std::process::id().to_string()).expect("failpoint pause file");
            std::fs::rename(&tmp, &file).expect("failpoint pause file");
            let go = file.with_extension("go");
            while !go.exists() {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
    }

    pub fn pieces(done: u64) {
        if let Some(n) = std::env::var("CKPT_CONVERT_ABORT_AFTER_PIECES")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            && done >= n
        {
            std::process::abort();
        }
        hit(&format!("pieces:{done}"));
    }

    pub fn read_error(path: &Path) -> Option<std::io::Error> {
        let name = std::env::var_os("CKPT_CONVERT_FAIL_READ")?;
        (path.file_name() == Some(name.as_os_str()))
            .then(|| std::io::Error::from_raw_os_error(libc::EIO))
    }
}

#[cfg(not(feature = "failpoints"))]
mod imp {
    use std::path::Path;

    #[inline]
    pub fn hit(_: &str) {}

    #[inline]
    pub fn pieces(_: u64) {}

    #[inline]
    pub fn read_error(_: &Path) -> Option<std::io::Error> {
        None
    }
}

/// The run reached `point`.
pub fn hit(point: &str) {
    imp::hit(point);
}

/// `done` pieces are written (the point `pieces:{done}`).
pub fn pieces(done: u64) {
    imp::pieces(done);
}

/// The error an injected read fault gives for `path`, if one is set.
pub fn read_error(path: &std::path::Path) -> Option<std::io::Error> {
    imp::read_error(path)
}
