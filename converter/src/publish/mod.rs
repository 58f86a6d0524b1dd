//! Publishing: write beside the target, commit by rename.
//!
//! Everything is written into a staging directory in the target's parent (same
//! filesystem, so `rename` is atomic), fsynced, and then renamed into place. No
//! state in between looks like a finished checkpoint.
//!
//! A staging directory is named `.NAME.ckpt-staging-ID` and holds a marker file
//! ([`MARKER`]) that its run keeps locked (`flock`) for as long as it lives; the
//! kernel drops the lock when the process ends, however it ends. So a staging
//! directory whose marker is unlocked belongs to a run that is gone: the next run
//! for the same target, or `ckpt-convert clean`, removes it ([`clean`]). A
//! directory without a complete marker is not ours and is left alone, and a
//! published output never carries a staging name.
//!
//! A run that fails removes its staging directory, and the directories it had to
//! create for its target (a new run directory, say) if they are still empty. A
//! run ended by SIGTERM, SIGINT or SIGHUP does the same before it exits
//! ([`signals`]).
//!
//! The parts of a split run (`workers=N part=I`, see `pipeline::split`) share one
//! staging directory, `.NAME.ckpt-staging-split` ([`SharedStaging`]): its name
//! follows from the target alone, so every part and the final step find it. Each
//! part holds a shared lock on its marker while it writes; the final step takes
//! the exclusive lock ([`Staging::adopt_shared`]) and publishes it by the same
//! rename. It outlives the runs that wrote it (that is its point): a failed part
//! or final step leaves it, another run for the target never removes it, and
//! `ckpt-convert clean` removes it when no part holds it.

pub mod signals;
mod stale;

pub use stale::{Cleaned, clean};

use std::fs::File;
use std::path::{Path, PathBuf};

/// Why publishing failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// A filesystem operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The target appeared while we were writing.
    #[error("{}: appeared while the conversion ran; not replacing it (use --overwrite)", path.display())]
    TargetAppeared {
        /// The target.
        path: PathBuf,
    },
    /// The output cannot be written where it was asked for (exit 2: nothing
    /// was written, and retrying will not help).
    #[error("{}: {why}: expected a directory this run may write {} into", path.display(), target.display())]
    NotWritable {
        /// The directory that could not be written.
        path: PathBuf,
        /// The output.
        target: PathBuf,
        /// `permission denied` or `read-only file system`.
        why: &'static str,
    },
    /// The run was told to stop before it could publish.
    #[error("interrupted before publishing; nothing was published")]
    Interrupted,
    /// A part of a split run still holds the shared staging directory.
    #[error("{}: a part of this split run is still writing it (its {MARKER} is locked): expected every part finished before finalize", path.display())]
    PartRunning {
        /// The shared staging directory.
        path: PathBuf,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PublishError + '_ {
    move |source| PublishError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Like [`io`] for creating `path` on the way to `target`, but a directory we
/// may not write is a refusal of its own.
fn creating<'a>(
    path: &'a Path,
    target: &'a Path,
) -> impl FnOnce(std::io::Error) -> PublishError + 'a {
    move |source| {
        let why = match source.raw_os_error() {
            Some(libc::EACCES | libc::EPERM) => Some("permission denied"),
            Some(libc::EROFS) => Some("read-only file system"),
            _ => None,
        };
        match why {
            Some(why) => PublishError::NotWritable {
                // The directory whose permission or filesystem refused.
                path: path.parent().unwrap_or(path).to_owned(),
                target: target.to_owned(),
                why,
            },
            None => PublishError::Io {
                path: path.to_owned(),
                source,
            },
        }
    }
}

const STAGING_TAG: &str = ".ckpt-staging-";
/// The ID of the staging directory the parts of a split run share.
const SHARED_ID: &str = "split";
const OLD_TAG: &str = ".ckpt-replaced-";
/// The marker file inside a staging directory (see the module docs).
pub const MARKER: &str = ".ckpt-staging";

/// A staging directory for one target.
#[derive(Debug)]
pub struct Staging {
    target: PathBuf,
    dir: PathBuf,
    /// The part of the staging name after the tag, shared with the name the
    /// replaced target gets while the new one moves in.
    id: String,
    done: bool,
    /// Parents created for the target, outermost first.
    created: Vec<PathBuf>,
    /// The marker, locked while this run lives.
    marker: Option<File>,
    /// A failure leaves the directory (a split run's shared staging: its parts'
    /// work, which this run did not write).
    keep: bool,
}

/// The directory that receives `target` (`.` for a bare name) and the target's name.
fn parent_and_name(target: &Path) -> (PathBuf, String) {
    let parent = target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "output".into());
    (parent.to_owned(), name)
}

/// Creates `parent` and its missing ancestors; returns those it created,
/// outermost first.
fn create_parents(parent: &Path, target: &Path) -> Result<Vec<PathBuf>, PublishError> {
    let mut created: Vec<PathBuf> = parent
        .ancestors()
        .take_while(|a| !a.as_os_str().is_empty() && !a.exists())
        .map(Path::to_owned)
        .collect();
    created.reverse();
    for d in &created {
        match std::fs::create_dir(d) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(creating(d, target)(e)),
        }
    }
    Ok(created)
}

/// Where the parts of a split run for `target` write: `.NAME.ckpt-staging-split`
/// beside it.
pub fn shared_staging_dir(target: &Path) -> PathBuf {
    let (parent, name) = parent_and_name(target);
    parent.join(format!(".{name}{STAGING_TAG}{SHARED_ID}"))
}

/// The staging directory of a split run, as one part holds it: created if it is
/// the first, its marker locked shared for as long as the part lives, so
/// `clean` and the final step see the part as running. Dropping it leaves the
/// directory and what the part wrote (see the module docs).
#[derive(Debug)]
pub struct SharedStaging {
    dir: PathBuf,
    _marker: File,
}

impl SharedStaging {
    /// Opens (creating if needed) the shared staging directory of `target`, and
    /// the directories above it.
    ///
    /// # Errors
    /// [`PublishError::NotWritable`] when the parent refuses; [`PublishError::Io`]
    /// for other failures, or when the name is taken by something that is not a
    /// directory.
    pub fn open(target: &Path) -> Result<SharedStaging, PublishError> {
        let (parent, _) = parent_and_name(target);
        create_parents(&parent, target)?;
        let dir = shared_staging_dir(target);
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(creating(&dir, target)(e)),
        }
        if !std::fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir()) {
            return Err(PublishError::Io {
                path: dir,
                source: std::io::Error::other("expected a staging directory, found another file"),
            });
        }
        let marker = stale::mark_shared(&dir, target)?;
        crate::failpoint::hit("staged");
        Ok(SharedStaging {
            dir,
            _marker: marker,
        })
    }

    /// Where to write.
    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Staging {
    /// Creates a fresh staging directory beside `target` (creating the parent if
    /// needed) and removes stale ones left by runs that are gone.
    ///
    /// # Errors
    /// [`PublishError::NotWritable`] when the parent refuses (permissions, a
    /// read-only filesystem); [`PublishError::Io`] for other failures.
    pub fn new(target: &Path) -> Result<Staging, PublishError> {
        let (parent, name) = parent_and_name(target);
        let created = create_parents(&parent, target)?;
        let cleaned = stale::clean_beside(target, false);
        for p in &cleaned.removed {
            tracing::warn!(path = %p.display(), "removed the staging directory of an interrupted run");
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let id = format!("{}-{nanos}", std::process::id());
        let dir = parent.join(format!(".{name}{STAGING_TAG}{id}"));
        if let Err(e) = std::fs::create_dir(&dir) {
            for d in created.iter().rev() {
                let _ = std::fs::remove_dir(d);
            }
            return Err(creating(&dir, target)(e));
        }
        let mut staging = Staging {
            target: target.to_owned(),
            dir,
            id,
            done: false,
            created,
            marker: None,
            keep: false,
        };
        signals::register(&staging.dir, &staging.created);
        // Dropping `staging` on error removes the directory again.
        staging.marker = Some(stale::mark(&staging.dir, target)?);
        crate::failpoint::hit("staged");
        Ok(staging)
    }

    /// Takes over the shared staging directory of a split run for `target`
    /// ([`SharedStaging`]) to publish it: its marker locked exclusively, so no
    /// part can start writing meanwhile. A failure before [`Staging::commit`]
    /// leaves the directory as the parts left it (plus what this run wrote).
    ///
    /// # Errors
    /// [`PublishError::PartRunning`] while a part holds it; [`PublishError::Io`]
    /// when it or its marker is missing.
    pub fn adopt_shared(target: &Path) -> Result<Staging, PublishError> {
        let dir = shared_staging_dir(target);
        let path = dir.join(MARKER);
        let marker = File::open(&path).map_err(io(&path))?;
        match marker.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(PublishError::PartRunning { path: dir });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(&path)(e)),
        }
        Ok(Staging {
            target: target.to_owned(),
            dir,
            id: SHARED_ID.into(),
            done: false,
            created: Vec::new(),
            marker: Some(marker),
            keep: true,
        })
    }

    /// Where to write.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The final path.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Renames the staging directory onto the target. With `overwrite`, an existing
    /// target is moved aside first and removed after the new one is in place.
    ///
    /// # Errors
    /// [`PublishError`] when a rename or sync fails, the target exists and
    /// `overwrite` is false, or the run is being interrupted.
    pub fn commit(mut self, overwrite: bool) -> Result<(), PublishError> {
        let parent = self.dir.parent().expect("staging has a parent").to_owned();
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))?;
        // A signal's cleanup and this commit exclude each other: the output is
        // either published whole or removed whole.
        let guard = signals::commit_guard()?;
        let mut replaced = None;
        if std::fs::symlink_metadata(&self.target).is_ok() {
            if !overwrite {
                return Err(PublishError::TargetAppeared {
                    path: self.target.clone(),
                });
            }
            let name = self
                .target
                .file_name()
                .expect("target has a name")
                .to_string_lossy();
            let aside = parent.join(format!(".{name}{OLD_TAG}{}", self.id));
            std::fs::rename(&self.target, &aside).map_err(io(&self.target))?;
            replaced = Some(aside);
            crate::failpoint::hit("commit:aside");
        }
        std::fs::rename(&self.dir, &self.target).map_err(io(&self.target))?;
        self.done = true;
        signals::deregister(&self.dir);
        signals::published();
        drop(guard);
        // The marker came along; the lock is released with it.
        match std::fs::remove_file(self.target.join(MARKER)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&self.target.join(MARKER))(e)),
        }
        self.marker = None;
        for d in [&self.target, &parent] {
            File::open(d).and_then(|f| f.sync_all()).map_err(io(d))?;
        }
        if let Some(old) = replaced {
            // A concurrent `clean` may be removing it too.
            match std::fs::remove_dir_all(&old) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&old)(e)),
            }
        }
        if self.id != SHARED_ID {
            remove_superseded_split(&self.target);
        }
        Ok(())
    }
}

/// Removes the shared staging a split run for `target` left (a failed split run
/// then done again in one process, say), now that `target` is published: what
/// its parts wrote can no longer be published without `--overwrite`, and nothing
/// else would ever remove it. Left as it is while a part holds it.
fn remove_superseded_split(target: &Path) {
    let dir = shared_staging_dir(target);
    let Ok(marker) = File::open(dir.join(MARKER)) else {
        return;
    };
    if marker.try_lock().is_err() {
        return;
    }
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => tracing::warn!(
            path = %dir.display(),
            "removed what a split run for this output had staged: the output is published"
        ),
        Err(e) => tracing::warn!(
            path = %dir.display(),
            error = %e,
            "could not remove what a split run for this output had staged (ckpt-convert clean removes it)"
        ),
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.done && !self.keep {
            signals::deregister(&self.dir);
            let _ = std::fs::remove_dir_all(&self.dir);
            // Only what is still empty: another writer may have put something there.
            for d in self.created.iter().rev() {
                let _ = std::fs::remove_dir(d);
            }
        }
    }
}

/// Writes a small file atomically: temp file in the same directory, fsync, rename,
/// fsync the directory.
///
/// # Errors
/// [`PublishError::Io`].
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), PublishError> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
    File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_runs_leave_nothing_and_commits_are_atomic() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("out");
        {
            let s = Staging::new(&target).unwrap();
            std::fs::write(s.path().join("a"), b"x").unwrap();
            // Dropped without commit: as if the conversion failed.
        }
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
        let s = Staging::new(&target).unwrap();
        std::fs::write(s.path().join("a"), b"x").unwrap();
        s.commit(false).unwrap();
        assert_eq!(std::fs::read(target.join("a")).unwrap(), b"x");
        // A second commit needs overwrite, and replaces the whole directory.
        let s = Staging::new(&target).unwrap();
        std::fs::write(s.path().join("b"), b"y").unwrap();
        let s2 = Staging::new(&tmp.path().join("other")).unwrap();
        drop(s2);
        assert!(matches!(
            Staging::new(&target).unwrap().commit(false),
            Err(PublishError::TargetAppeared { .. })
        ));
        s.commit(true).unwrap();
        assert!(!target.join("a").exists());
        assert_eq!(std::fs::read(target.join("b")).unwrap(), b"y");
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_failed_run_removes_the_directories_it_created() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("run/sub/iter_0000000");
        drop(Staging::new(&target).unwrap());
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
        // A directory that gained other content meanwhile stays.
        let s = Staging::new(&target).unwrap();
        std::fs::write(tmp.path().join("run/other"), b"x").unwrap();
        drop(s);
        assert!(tmp.path().join("run/other").is_file());
        assert!(!tmp.path().join("run/sub").exists());
    }

    #[test]
    fn a_split_runs_shared_staging_outlives_its_parts_until_clean() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("run/iter_0000000");
        // Two parts side by side; finalize waits for both.
        let a = SharedStaging::open(&target).unwrap();
        let b = SharedStaging::open(&target).unwrap();
        assert_eq!(a.path(), shared_staging_dir(&target));
        std::fs::write(a.path().join("x"), b"x").unwrap();
        assert!(matches!(
            Staging::adopt_shared(&target),
            Err(PublishError::PartRunning { .. })
        ));
        drop(a);
        let c = clean(&tmp.path().join("run")).unwrap();
        assert!(c.removed.is_empty(), "{c:?}");
        drop(b);
        // Between parts nobody holds it: another run for the target leaves it,
        // and so does a failed finalize.
        drop(Staging::new(&target).unwrap());
        drop(Staging::adopt_shared(&target).unwrap());
        assert!(shared_staging_dir(&target).join("x").is_file());
        // Another run that publishes the target supersedes it, unless a part
        // holds it.
        let holder = SharedStaging::open(&target).unwrap();
        Staging::new(&target).unwrap().commit(false).unwrap();
        assert!(shared_staging_dir(&target).join("x").is_file());
        drop(holder);
        Staging::new(&target).unwrap().commit(true).unwrap();
        assert!(!shared_staging_dir(&target).exists());
        std::fs::remove_dir_all(&target).unwrap();
        let a = SharedStaging::open(&target).unwrap();
        std::fs::write(a.path().join("x"), b"x").unwrap();
        drop(a);
        // `clean` removes it; a finalize publishes it.
        let c = clean(&tmp.path().join("run")).unwrap();
        assert_eq!(c.removed, vec![shared_staging_dir(&target)]);
        drop(SharedStaging::open(&target).unwrap());
        Staging::adopt_shared(&target)
            .unwrap()
            .commit(false)
            .unwrap();
        assert!(target.is_dir() && !target.join(MARKER).exists());
        assert!(!shared_staging_dir(&target).exists());
    }

    #[test]
    fn a_live_runs_staging_is_kept_and_a_dead_ones_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("out");
        let live = Staging::new(&target).unwrap();
        // Another run for the same target leaves the live one alone.
        let other = Staging::new(&target).unwrap();
        assert!(live.path().join(MARKER).is_file());
        drop(other);
        // A run that is gone: its marker is complete but nobody holds the lock.
        let dead = tmp.path().join(format!(".out{STAGING_TAG}1-1"));
        std::fs::create_dir(&dead).unwrap();
        drop(stale::mark(&dead, &target).unwrap());
        // Not ours: no marker.
        let foreign = tmp.path().join(format!(".out{STAGING_TAG}2-2"));
        std::fs::create_dir(&foreign).unwrap();
        let c = clean(tmp.path()).unwrap();
        assert_eq!(c.removed, vec![dead.clone()]);
        assert!(!dead.exists() && foreign.exists() && live.path().exists());
        assert_eq!(c.kept.len(), 2, "{:?}", c.kept);
        live.commit(false).unwrap();
        assert!(target.is_dir() && !target.join(MARKER).exists());
    }
}
