//! What runs that are gone left behind, and removing it safely.
//!
//! Only names with our tags are ever considered, and never through a link:
//! - `.NAME.ckpt-staging-ID`: removed when its marker is complete and no process
//!   holds its lock (the run that made it is gone); kept when the lock is held (a
//!   live run) or the marker is missing or incomplete (not ours, or a run that is
//!   just starting: the marker is written only after it is locked);
//! - `.NAME.ckpt-staging-split`, a split run's shared staging: the same, but only
//!   on `ckpt-convert clean`; a run for the same target leaves it (its parts run
//!   one after another, with nobody holding it in between);
//! - `.NAME.ckpt-replaced-ID`: a published output that a run with `--overwrite`
//!   moved aside. While `.NAME.ckpt-staging-ID` is live it is that run's; when
//!   `NAME` is in place it was superseded and is removed; when `NAME` is missing
//!   the run died between its two renames and it is renamed back;
//! - a `MARKER` left in a published output by a run killed right after its
//!   rename: the file alone is removed.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{MARKER, OLD_TAG, PublishError, SHARED_ID, STAGING_TAG, io};

/// The marker's content.
#[derive(Debug, Serialize, Deserialize)]
struct Marker {
    /// Always `ckpt-staging`.
    format: String,
    /// The run's process id, for people reading it.
    pid: u32,
    /// The output the run was writing.
    target: String,
}

const MARKER_FORMAT: &str = "ckpt-staging";

/// Creates and locks the marker of the staging directory `dir`, then writes it.
/// The returned file holds the lock; the lock ends with the process.
pub(super) fn mark(dir: &Path, target: &Path) -> Result<File, PublishError> {
    let path = dir.join(MARKER);
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(io(&path))?;
    f.lock().map_err(io(&path))?;
    f.write_all(marker_text(target).as_bytes())
        .map_err(io(&path))?;
    Ok(f)
}

/// A marker's content, for this process writing `target`.
fn marker_text(target: &Path) -> String {
    let m = Marker {
        format: MARKER_FORMAT.into(),
        pid: std::process::id(),
        target: target.display().to_string(),
    };
    serde_json::to_string(&m).expect("marker serializes")
}

/// Opens the marker of a split run's shared staging directory `dir`, creating
/// it if this part is the first, and locks it shared (parts write side by side).
/// A new marker is written complete under a temporary name and linked into
/// place while locked, so nobody ever sees it incomplete or unlocked.
pub(super) fn mark_shared(dir: &Path, target: &Path) -> Result<File, PublishError> {
    let path = dir.join(MARKER);
    let existing = || -> Result<File, PublishError> {
        let f = File::open(&path).map_err(io(&path))?;
        f.lock_shared().map_err(io(&path))?;
        Ok(f)
    };
    if std::fs::symlink_metadata(&path).is_ok() {
        return existing();
    }
    let tmp = dir.join(format!("{MARKER}.tmp-{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.lock_shared().map_err(io(&tmp))?;
    f.write_all(marker_text(target).as_bytes())
        .map_err(io(&tmp))?;
    let linked = std::fs::hard_link(&tmp, &path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(f),
        // Another part was first.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => existing(),
        Err(e) => Err(io(&path)(e)),
    }
}

/// What a cleanup did.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct Cleaned {
    /// Staging directories of runs that are gone, and superseded old outputs,
    /// removed (and stray markers in published outputs).
    pub removed: Vec<PathBuf>,
    /// Old outputs put back in place: (from, to).
    pub restored: Vec<(PathBuf, PathBuf)>,
    /// What was left alone, and why.
    pub kept: Vec<(PathBuf, String)>,
}

enum Owner {
    /// A live run holds the lock.
    Live(u32),
    /// Complete marker, unlocked: the run is gone. The file holds the lock now.
    Gone(File),
    /// Not a staging directory we made (or one being made this moment).
    Unknown(String),
}

fn owner(dir: &Path) -> Owner {
    let path = dir.join(MARKER);
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.is_file() => {}
        Ok(_) => return Owner::Unknown(format!("{MARKER} is not a regular file")),
        Err(_) => return Owner::Unknown(format!("no {MARKER} marker")),
    }
    let Ok(mut f) = File::open(&path) else {
        return Owner::Unknown(format!("{MARKER} cannot be opened"));
    };
    let mut text = String::new();
    let read = (&mut f).take(64 << 10).read_to_string(&mut text);
    let marker = read
        .ok()
        .and_then(|_| serde_json::from_str::<Marker>(&text).ok())
        .filter(|m| m.format == MARKER_FORMAT);
    let Some(marker) = marker else {
        return Owner::Unknown(format!("{MARKER} is incomplete (a run starting now?)"));
    };
    match f.try_lock() {
        Ok(()) => Owner::Gone(f),
        Err(std::fs::TryLockError::WouldBlock) => Owner::Live(marker.pid),
        Err(std::fs::TryLockError::Error(e)) => {
            Owner::Unknown(format!("{MARKER} cannot be locked ({e})"))
        }
    }
}

/// Splits `.NAME<tag>ID` into (NAME, ID).
fn parse<'a>(file_name: &'a str, tag: &str) -> Option<(&'a str, &'a str)> {
    let rest = file_name.strip_prefix('.')?;
    let at = rest.rfind(tag)?;
    let (name, id) = (&rest[..at], &rest[at + tag.len()..]);
    (!name.is_empty() && !id.is_empty()).then_some((name, id))
}

fn is_dir_not_link(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir())
}

/// Cleans the entries of `dir` whose target name satisfies `wanted`; a split
/// run's shared staging only when `shared`.
fn clean_in(dir: &Path, wanted: &dyn Fn(&str) -> bool, shared: bool, out: &mut Cleaned) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut names: Vec<String> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    // Old outputs first: their fate depends on whether their run's staging
    // directory is live, which the second pass may remove.
    for n in &names {
        let Some((name, id)) = parse(n, OLD_TAG).filter(|(name, _)| wanted(name)) else {
            continue;
        };
        let old = dir.join(n);
        if !is_dir_not_link(&old) {
            continue;
        }
        let target = dir.join(name);
        let staging = dir.join(format!(".{name}{STAGING_TAG}{id}"));
        if is_dir_not_link(&staging)
            && let Owner::Live(pid) = owner(&staging)
        {
            out.kept
                .push((old, format!("run {pid} is replacing {name} with it")));
            continue;
        }
        if std::fs::symlink_metadata(&target).is_ok() {
            if is_dir_not_link(&staging) {
                out.kept.push((
                    old,
                    format!("{name} exists again while its replacement never finished; compare them by hand"),
                ));
            } else if std::fs::remove_dir_all(&old).is_ok() {
                out.removed.push(old);
            }
        } else if std::fs::rename(&old, &target).is_ok() {
            out.restored.push((old, target));
        }
    }
    for n in &names {
        let Some((name, id)) = parse(n, STAGING_TAG).filter(|(name, _)| wanted(name)) else {
            continue;
        };
        let staging = dir.join(n);
        if !is_dir_not_link(&staging) {
            continue;
        }
        if id == SHARED_ID && !shared {
            out.kept.push((
                staging,
                format!(
                    "the shared staging of a split run for {name} (ckpt-convert clean removes it)"
                ),
            ));
            continue;
        }
        match owner(&staging) {
            Owner::Live(pid) => out.kept.push((staging, format!("run {pid} is writing it"))),
            Owner::Unknown(why) => out.kept.push((staging, why)),
            Owner::Gone(lock) => {
                // Removed while we hold its lock, so no run can take it meanwhile.
                if std::fs::remove_dir_all(&staging).is_ok() {
                    out.removed.push(staging);
                }
                drop(lock);
            }
        }
    }
}

/// A marker left inside a published output by a run killed right after its rename.
fn clean_published(output: &Path, out: &mut Cleaned) {
    let marker = output.join(MARKER);
    if is_dir_not_link(output)
        && let Owner::Gone(lock) = owner(output)
    {
        if std::fs::remove_file(&marker).is_ok() {
            out.removed.push(marker);
        }
        drop(lock);
    }
}

/// What interrupted runs left beside `target` (its staging directories, an old
/// output moved aside; a split run's shared staging only when `shared`). Never
/// fails: what cannot be removed is reported as kept.
pub(super) fn clean_beside(target: &Path, shared: bool) -> Cleaned {
    let mut out = Cleaned::default();
    let (Some(name), parent) = (
        target.file_name().map(|n| n.to_string_lossy().into_owned()),
        target
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new(".")),
    ) else {
        return out;
    };
    clean_in(parent, &|n| n == name, shared, &mut out);
    clean_published(target, &mut out);
    out
}

/// `ckpt-convert clean PATH`: removes what interrupted runs left in the
/// directory `PATH` (for any output inside it) and beside `PATH` (for `PATH`
/// itself as an output), as the module docs describe. Live runs' staging,
/// published outputs and anything without our marker are never touched.
///
/// # Errors
/// [`PublishError::Io`] when neither `PATH` nor its parent exists.
pub fn clean(path: &Path) -> Result<Cleaned, PublishError> {
    if std::fs::symlink_metadata(path).is_err() {
        // An output an interrupted run left missing: look beside it.
        let parent = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::symlink_metadata(parent).map_err(io(path))?;
    }
    let mut out = clean_beside(path, true);
    if is_dir_not_link(path) {
        clean_in(path, &|_| true, true, &mut out);
        // Published outputs directly inside (an iteration of a run directory).
        if let Ok(rd) = std::fs::read_dir(path) {
            for e in rd.filter_map(|e| e.ok()) {
                clean_published(&e.path(), &mut out);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publish::Staging;

    #[test]
    fn names() {
        assert_eq!(
            parse(".iter_0000001.ckpt-staging-12-34", STAGING_TAG),
            Some(("iter_0000001", "12-34"))
        );
        assert_eq!(parse("iter_0000001", STAGING_TAG), None);
        assert_eq!(parse(".x.ckpt-staging-", STAGING_TAG), None);
    }

    #[test]
    fn an_overwrite_killed_between_its_renames_is_undone() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("out");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("old"), b"o").unwrap();
        // The dead run: staging unlocked, the old output aside, no target.
        let staging = tmp.path().join(format!(".out{STAGING_TAG}7-7"));
        std::fs::create_dir(&staging).unwrap();
        drop(mark(&staging, &target).unwrap());
        let aside = tmp.path().join(format!(".out{OLD_TAG}7-7"));
        std::fs::rename(&target, &aside).unwrap();
        let c = clean(&target).unwrap();
        assert_eq!(c.restored, vec![(aside, target.clone())]);
        assert_eq!(c.removed, vec![staging]);
        assert_eq!(std::fs::read(target.join("old")).unwrap(), b"o");
        // A superseded old output (its run got the new one in place) goes.
        let aside = tmp.path().join(format!(".out{OLD_TAG}8-8"));
        std::fs::create_dir(&aside).unwrap();
        assert_eq!(clean(tmp.path()).unwrap().removed, vec![aside]);
        assert!(target.join("old").is_file());
    }

    #[test]
    fn a_live_overwrite_is_left_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("out");
        let live = Staging::new(&target).unwrap();
        let aside = tmp.path().join(format!(".out{OLD_TAG}{}", live.id));
        std::fs::create_dir(&aside).unwrap();
        let c = clean(tmp.path()).unwrap();
        assert!(c.removed.is_empty() && c.restored.is_empty(), "{c:?}");
        assert!(aside.is_dir() && live.path().is_dir());
    }

    #[test]
    fn links_are_never_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let victim = tmp.path().join("victim");
        std::fs::create_dir(&victim).unwrap();
        std::fs::write(victim.join("data"), b"d").unwrap();
        let link = tmp.path().join(format!(".out{STAGING_TAG}1-1"));
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let old = tmp.path().join(format!(".out{OLD_TAG}1-1"));
        std::os::unix::fs::symlink(&victim, &old).unwrap();
        let c = clean(tmp.path()).unwrap();
        assert!(c.removed.is_empty() && c.restored.is_empty(), "{c:?}");
        assert!(victim.join("data").is_file());
    }
}
