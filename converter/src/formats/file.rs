//! Opening source files, whatever a source directory holds.
//!
//! Threat model: a source directory may come from anyone. A FIFO where a JSON file
//! should be makes an ordinary open block forever; a link to `/dev/zero` makes an
//! ordinary read never end; a link to a file outside the checkpoint would have us
//! read, and publish, what its owner never meant to share. So every file of a
//! source is opened here:
//! - non-blocking, then required to be a regular file (a FIFO, device, socket or
//!   directory is refused by name);
//! - required to resolve inside the directory it was found in, or inside the
//!   Hugging Face cache repository that directory belongs to (the cache's own
//!   `snapshots/<rev>/f → ../../blobs/<hash>` links stay allowed); the check is
//!   made on the file actually opened, so a link swapped meanwhile changes nothing;
//! - read only up to the size its format allows ([`limit`]), checked before any
//!   allocation;
//! - a read error is an error: only "does not exist" means absent.
//!
//! A file's [`Identity`] (device, inode, size, times) is kept where data is read
//! later, so that a source rewritten or replaced while a run reads it is detected
//! before anything is published.

use std::fs::{File, Metadata};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::FormatError;

/// The most bytes each kind of small file may hold. Real files are far smaller;
/// the limits only stop a hostile file from making us allocate without bound.
pub mod limit {
    /// `config.json`, `generation_config.json`, `metadata.json`,
    /// `adapter_config.json` and other JSON configuration.
    pub const CONFIG: u64 = 16 << 20;
    /// `model.safetensors.index.json` (about 100 bytes per tensor).
    pub const INDEX: u64 = 256 << 20;
    /// `run_config.yaml`.
    pub const YAML: u64 = 16 << 20;
    /// `latest_checkpointed_iteration.txt` and the HF cache's `refs/*`.
    pub const TRACKER: u64 = 4096;
    /// A DCP `.metadata` (it lists every chunk, optimizer state included).
    pub const DCP_METADATA: u64 = 1 << 30;
    /// `common.pt`.
    pub const COMMON: u64 = 256 << 20;
    /// `tokenizer.json`, read for the smoke test's generation.
    pub const TOKENIZER: u64 = 256 << 20;
}

/// Who a file is, as the filesystem sees it: a rewrite changes the times or size,
/// a replacement changes the inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl Identity {
    /// The identity described by `m`.
    pub fn of(m: &Metadata) -> Identity {
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Identity {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: ns(m.mtime(), m.mtime_nsec()),
            ctime_ns: ns(m.ctime(), m.ctime_nsec()),
        }
    }

    /// The size when the identity was taken.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Checks that `path` is still this file, unchanged.
    ///
    /// # Errors
    /// [`FormatError::Changed`] saying what changed (exit code 1: the run read a
    /// moving source, so its output cannot be trusted).
    pub fn check(&self, path: &Path) -> Result<(), FormatError> {
        let changed = |why: String| FormatError::Changed {
            path: path.to_owned(),
            why,
        };
        let now = match std::fs::metadata(path) {
            Ok(m) => Identity::of(&m),
            Err(e) => return Err(changed(format!("can no longer be read ({e})"))),
        };
        if (now.dev, now.ino) != (self.dev, self.ino) {
            return Err(changed("was replaced by another file".into()));
        }
        if now.size != self.size {
            return Err(changed(format!(
                "was {} bytes when opened and is {} bytes now (truncated or appended to)",
                self.size, now.size
            )));
        }
        if (now.mtime_ns, now.ctime_ns) != (self.mtime_ns, self.ctime_ns) {
            return Err(changed(
                "was rewritten (its modification time changed)".into(),
            ));
        }
        Ok(())
    }
}

fn kind_of(m: &Metadata) -> &'static str {
    let t = m.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// The directory a file found in `dir` must stay inside: `dir` itself (resolved),
/// or, when `dir` lies under a Hugging Face cache repository
/// (`models--org--name/snapshots/<rev>/…`), that repository, whose snapshot links
/// point into its `blobs/`.
pub fn source_root(dir: &Path) -> PathBuf {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned());
    for a in dir.ancestors() {
        if a.file_name().is_some_and(|n| n == "snapshots")
            && let Some(repo) = a.parent()
            && repo.file_name().is_some_and(|n| {
                let n = n.to_string_lossy();
                ["models--", "datasets--", "spaces--"]
                    .iter()
                    .any(|p| n.starts_with(p))
            })
        {
            return repo.to_owned();
        }
    }
    dir
}

/// Where the open file `f` really is (its path with every link resolved).
fn real_path(f: &File, path: &Path) -> PathBuf {
    use std::os::fd::AsRawFd;
    std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd()))
        .or_else(|_| std::fs::canonicalize(path))
        .unwrap_or_else(|_| path.to_owned())
}

/// Refuses `real` (where `path` resolves to) outside the source root of the
/// directory `path` was found in.
fn check_contained(path: &Path, real: &Path) -> Result<(), FormatError> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let root = source_root(dir);
    if real.starts_with(&root) {
        return Ok(());
    }
    Err(FormatError::File {
        path: path.to_owned(),
        why: format!(
            "is a link to {}, outside {}: expected the file itself, or a link that stays inside the checkpoint (copy the file in to use it)",
            real.display(),
            root.display()
        ),
    })
}

fn open_checked(path: &Path, contained: bool) -> Result<(File, Metadata), FormatError> {
    if let Some(e) = crate::failpoint::read_error(path) {
        return Err(FormatError::io(path, e));
    }
    // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| FormatError::io(path, e))?;
    let m = f.metadata().map_err(|e| FormatError::io(path, e))?;
    if !m.is_file() {
        return Err(FormatError::File {
            path: path.to_owned(),
            why: format!("expected a regular file, found {}", kind_of(&m)),
        });
    }
    if contained {
        check_contained(path, &real_path(&f, path))?;
    }
    Ok((f, m))
}

/// Opens a regular file of a source directory for reading (see the module docs),
/// with its metadata.
///
/// # Errors
/// [`FormatError::Io`] when it cannot be opened; [`FormatError::File`] when it is
/// not a regular file or resolves outside its directory.
pub fn open(path: &Path) -> Result<(File, Metadata), FormatError> {
    open_checked(path, true)
}

/// Checks, without reading it, that `path` is a regular file inside its
/// directory, as [`open`] would.
///
/// # Errors
/// As [`open`].
pub fn check(path: &Path) -> Result<(), FormatError> {
    open(path).map(|_| ())
}

fn read_from(path: &Path, f: File, m: &Metadata, max: u64) -> Result<Vec<u8>, FormatError> {
    let too_large = |n: u64| FormatError::File {
        path: path.to_owned(),
        why: format!("is {n} bytes, more than the {max} bytes this kind of file may hold"),
    };
    if m.len() > max {
        return Err(too_large(m.len()));
    }
    let mut out = Vec::with_capacity(m.len() as usize);
    // One byte past the limit tells a file that grew from one that fits.
    f.take(max + 1)
        .read_to_end(&mut out)
        .map_err(|e| FormatError::io(path, e))?;
    if out.len() as u64 > max {
        return Err(too_large(out.len() as u64));
    }
    Ok(out)
}

/// Reads a whole file of a source directory, of at most `max` bytes.
///
/// # Errors
/// As [`open`], or [`FormatError::File`] when it is larger than `max`, or the
/// I/O error of reading.
pub fn read(path: &Path, max: u64) -> Result<Vec<u8>, FormatError> {
    let (f, m) = open(path)?;
    read_from(path, f, &m, max)
}

/// [`read`], with `None` when the file does not exist (any other error is one).
///
/// # Errors
/// As [`read`].
pub fn read_opt(path: &Path, max: u64) -> Result<Option<Vec<u8>>, FormatError> {
    match read(path, max) {
        Err(FormatError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            Ok(None)
        }
        other => other.map(Some),
    }
}

fn utf8(path: &Path, bytes: Vec<u8>) -> Result<String, FormatError> {
    String::from_utf8(bytes).map_err(|e| FormatError::File {
        path: path.to_owned(),
        why: format!(
            "expected UTF-8 text, found an invalid byte at offset {}",
            e.utf8_error().valid_up_to()
        ),
    })
}

/// [`read`] as UTF-8 text.
///
/// # Errors
/// As [`read`], or [`FormatError::File`] for bytes that are not UTF-8.
pub fn read_text(path: &Path, max: u64) -> Result<String, FormatError> {
    utf8(path, read(path, max)?)
}

/// [`read_opt`] as UTF-8 text.
///
/// # Errors
/// As [`read_text`].
pub fn read_text_opt(path: &Path, max: u64) -> Result<Option<String>, FormatError> {
    read_opt(path, max)?.map(|b| utf8(path, b)).transpose()
}

/// Reads a file the user named directly (so a link is followed wherever it
/// points), regular files only, at most `max` bytes, as UTF-8 text.
///
/// # Errors
/// As [`read_text`].
pub fn read_named_text(path: &Path, max: u64) -> Result<String, FormatError> {
    let (f, m) = open_checked(path, false)?;
    utf8(path, read_from(path, f, &m, max)?)
}

/// Copies a source file to a new file `to` (created, never replaced): exactly the
/// bytes the source had when opened, refused if it changes length meanwhile.
/// Returns the bytes copied.
///
/// # Errors
/// As [`open`] for the source; the I/O error of writing `to`;
/// [`FormatError::Changed`] when the source shrank or grew while being copied.
pub fn copy(from: &Path, to: &Path) -> Result<u64, FormatError> {
    let (f, m) = open(from)?;
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(to)
        .map_err(|e| FormatError::io(to, e))?;
    let n =
        std::io::copy(&mut f.take(m.len() + 1), &mut out).map_err(|e| FormatError::io(to, e))?;
    if n != m.len() {
        return Err(FormatError::Changed {
            path: from.to_owned(),
            why: format!(
                "was {} bytes when opened and gave {n} bytes while being copied",
                m.len()
            ),
        });
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("config.json");
        let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let err = read(&p, limit::CONFIG).unwrap_err().to_string();
        assert!(
            err.contains("expected a regular file, found a FIFO"),
            "{err}"
        );
        assert!(err.contains("config.json"), "{err}");
    }

    #[test]
    fn a_link_to_a_device_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("metadata.json");
        std::os::unix::fs::symlink("/dev/zero", &p).unwrap();
        let err = read_opt(&p, limit::CONFIG).unwrap_err().to_string();
        assert!(err.contains("found a character device"), "{err}");
    }

    #[test]
    fn reads_are_bounded_and_absence_is_not_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("a.json");
        std::fs::write(&p, vec![b' '; 100]).unwrap();
        let err = read(&p, 99).unwrap_err().to_string();
        assert!(
            err.contains("is 100 bytes, more than the 99 bytes"),
            "{err}"
        );
        assert_eq!(read(&p, 100).unwrap().len(), 100);
        assert!(read_opt(&tmp.path().join("none"), 10).unwrap().is_none());
        // Unreadable is not absent: a directory in place of a file.
        std::fs::create_dir(tmp.path().join("d")).unwrap();
        assert!(read_opt(&tmp.path().join("d"), 10).is_err());
    }

    #[test]
    fn links_leaving_the_directory_are_refused_but_cache_links_are_not() {
        let tmp = tempfile::tempdir().unwrap();
        let secret = tmp.path().join("secret.txt");
        std::fs::write(&secret, b"s").unwrap();
        let model = tmp.path().join("model");
        std::fs::create_dir(&model).unwrap();
        let link = model.join("tokenizer.json");
        std::os::unix::fs::symlink(&secret, &link).unwrap();
        let err = read(&link, 10).unwrap_err().to_string();
        assert!(
            err.contains("tokenizer.json: is a link to") && err.contains("secret.txt"),
            "{err}"
        );
        // A link inside the directory is fine.
        std::fs::write(model.join("real.json"), b"{}").unwrap();
        std::os::unix::fs::symlink("real.json", model.join("alias.json")).unwrap();
        assert_eq!(read(&model.join("alias.json"), 10).unwrap(), b"{}");
        // The HF cache layout: snapshots/<rev>/f -> ../../blobs/<hash>.
        let repo = tmp.path().join("hub/models--org--m");
        std::fs::create_dir_all(repo.join("blobs")).unwrap();
        std::fs::create_dir_all(repo.join("snapshots/abc")).unwrap();
        std::fs::write(repo.join("blobs/123"), b"{}").unwrap();
        std::os::unix::fs::symlink("../../blobs/123", repo.join("snapshots/abc/config.json"))
            .unwrap();
        assert_eq!(
            read(&repo.join("snapshots/abc/config.json"), 10).unwrap(),
            b"{}"
        );
        std::os::unix::fs::symlink(&secret, repo.join("snapshots/abc/vocab.json")).unwrap();
        assert!(read(&repo.join("snapshots/abc/vocab.json"), 10).is_err());
    }

    #[test]
    fn identity_sees_rewrites_and_replacements() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("w");
        std::fs::write(&p, b"abcd").unwrap();
        let id = Identity::of(&std::fs::metadata(&p).unwrap());
        id.check(&p).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(2)
            .unwrap();
        assert!(id.check(&p).unwrap_err().to_string().contains("truncated"));
        let q = tmp.path().join("q");
        std::fs::write(&q, b"abcd").unwrap();
        std::fs::rename(&q, &p).unwrap();
        assert!(id.check(&p).unwrap_err().to_string().contains("replaced"));
    }
}
