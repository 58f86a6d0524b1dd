//! Publishing: write beside the target, commit by rename.
//!
//! Everything is written into a staging directory in the target's parent (same
//! filesystem, so `rename` is atomic), fsynced, and then renamed into place. A run
//! that fails removes its staging directory; a run that is killed leaves one whose
//! name says it is incomplete (`.NAME.ckpt-staging-PID`), which the next run for the
//! same target removes once its process is gone. No state in between looks like a
//! finished checkpoint. Directories the run had to create for its target (a new
//! run directory, say) are removed again when it fails, if they are still empty.

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
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PublishError + '_ {
    move |source| PublishError::Io {
        path: path.to_owned(),
        source,
    }
}

const STAGING_TAG: &str = ".ckpt-staging-";
const OLD_TAG: &str = ".ckpt-replaced-";

/// A staging directory for one target.
#[derive(Debug)]
pub struct Staging {
    target: PathBuf,
    dir: PathBuf,
    done: bool,
    /// Parents created for the target, outermost first.
    created: Vec<PathBuf>,
}

fn process_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Leftover staging directories of `target` whose writer process is gone.
pub fn stale_staging(target: &Path) -> Vec<PathBuf> {
    let (Some(parent), Some(name)) = (target.parent(), target.file_name()) else {
        return Vec::new();
    };
    let prefix = format!(".{}{STAGING_TAG}", name.to_string_lossy());
    let Ok(rd) = std::fs::read_dir(if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    }) else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok())
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            let pid: u32 = n.strip_prefix(&prefix)?.split('-').next()?.parse().ok()?;
            (!process_alive(pid)).then(|| e.path())
        })
        .collect()
}

impl Staging {
    /// Creates a fresh staging directory beside `target` (creating the parent if
    /// needed) and removes stale ones left by killed runs.
    ///
    /// # Errors
    /// [`PublishError::Io`] when the directory cannot be created.
    pub fn new(target: &Path) -> Result<Staging, PublishError> {
        let parent = target
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "output".into());
        let mut created: Vec<PathBuf> = parent
            .ancestors()
            .take_while(|a| !a.as_os_str().is_empty() && !a.exists())
            .map(Path::to_owned)
            .collect();
        created.reverse();
        std::fs::create_dir_all(parent).map_err(io(parent))?;
        for stale in stale_staging(target) {
            tracing::warn!(path = %stale.display(), "removing the staging directory of an interrupted run");
            let _ = std::fs::remove_dir_all(&stale);
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = parent.join(format!(
            ".{name}{STAGING_TAG}{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir(&dir).map_err(io(&dir))?;
        Ok(Staging {
            target: target.to_owned(),
            dir,
            done: false,
            created,
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
    /// [`PublishError`] when a rename or sync fails, or the target exists and
    /// `overwrite` is false.
    pub fn commit(mut self, overwrite: bool) -> Result<(), PublishError> {
        let parent = self.dir.parent().expect("staging has a parent").to_owned();
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))?;
        let mut replaced = None;
        if self.target.exists() {
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
            let aside = parent.join(format!(".{name}{OLD_TAG}{}", std::process::id()));
            std::fs::rename(&self.target, &aside).map_err(io(&self.target))?;
            replaced = Some(aside);
        }
        std::fs::rename(&self.dir, &self.target).map_err(io(&self.target))?;
        self.done = true;
        File::open(&parent)
            .and_then(|d| d.sync_all())
            .map_err(io(&parent))?;
        if let Some(old) = replaced {
            std::fs::remove_dir_all(&old).map_err(io(&old))?;
        }
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.done {
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
    fn stale_staging_of_dead_processes_is_found() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("out");
        // No process has this id (above the kernel maximum of 2^22).
        let dead = tmp.path().join(format!(".out{STAGING_TAG}999999999-1"));
        std::fs::create_dir(&dead).unwrap();
        assert_eq!(stale_staging(&target), vec![dead.clone()]);
        let _s = Staging::new(&target).unwrap();
        assert!(!dead.exists());
    }
}
