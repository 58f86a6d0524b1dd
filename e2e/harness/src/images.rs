//! The converter and operator images, as `images/build.sh` builds them: OCI
//! image layouts and oci-archive tarballs of the static musl binaries; and the
//! test image `ckpt-convert-failpoints` (`CKPT_IMAGES_TEST=1`), which pauses a
//! conversion at its first written piece.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use crate::bins::workspace_root;
use crate::error::{Error, Result};

/// One built image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// `ckpt-convert`, `ckpt-operator` or `ckpt-convert-failpoints`.
    pub name: String,
    /// The reference recorded in the archive, e.g. `ghcr.io/ckpt-dev/ckpt-convert:0.1.0`.
    pub reference: String,
    /// The manifest digest, `sha256:…`.
    pub digest: String,
    /// The oci-archive tarball.
    pub archive: PathBuf,
    /// The OCI image layout directory.
    pub layout: PathBuf,
}

impl Image {
    /// The digest of the image's config blob, `sha256:…` (what containerd 1.6
    /// reports as a pod's `imageID` for an image imported from an archive).
    pub fn config_digest(&self) -> Result<String> {
        let manifest = self
            .layout
            .join("blobs/sha256")
            .join(self.digest.trim_start_matches("sha256:"));
        let text = std::fs::read(&manifest).map_err(|e| Error::io(&manifest, e))?;
        let json: serde_json::Value = serde_json::from_slice(&text).map_err(|e| Error::Images {
            message: format!("{}: {e}", manifest.display()),
        })?;
        json["config"]["digest"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| Error::Images {
                message: format!("{}: no config digest", manifest.display()),
            })
    }

    /// Whether a pod's `imageID` names this image (by manifest or config digest).
    pub fn is_image_id(&self, image_id: &str) -> bool {
        image_id.contains(&self.digest)
            || self.config_digest().is_ok_and(|c| image_id.ends_with(&c))
    }
}

/// Both images.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Images {
    /// The converter's.
    pub converter: Image,
    /// The operator's.
    pub operator: Image,
    /// The test image: the converter with failpoints, at the same path, whose
    /// config sets `CKPT_CONVERT_PAUSE_AT=pieces:1` and
    /// `CKPT_CONVERT_PAUSE_FILE=/tmp/ckpt-pause`: a conversion started from it
    /// writes its pid there once one piece is staged, then waits for
    /// `/tmp/ckpt-pause.go`, which no test writes.
    pub converter_failpoints: Image,
}

/// Runs `images/build.sh` with `OUT=out`, `CKPT_IMAGES_TEST=1` (and `CKPT_IMAGES_NO_CARGO=1` when
/// `no_cargo`, to reuse the binaries already built) and returns what it
/// printed. Its progress goes to this process's stderr.
pub fn build_images(out: &Path, no_cargo: bool) -> Result<Images> {
    let script = workspace_root().join("images/build.sh");
    let mut cmd = Command::new("bash");
    // The binaries go where this process looks for them.
    cmd.arg(&script)
        .env("OUT", out)
        .env("CARGO_TARGET_DIR", target_dir())
        .env("CKPT_IMAGES_TEST", "1")
        .stdin(Stdio::null())
        .stderr(Stdio::inherit());
    if no_cargo {
        cmd.env("CKPT_IMAGES_NO_CARGO", "1");
    }
    // `cargo test` gives this process variables (CARGO_PKG_*, CARGO_MANIFEST_*,
    // …) that build scripts (ring's, through cc) watch: passed on, they would
    // make the nested build rebuild what run-tests.sh already built.
    for (key, _) in std::env::vars_os() {
        if let Some(k) = key.to_str()
            && (k.starts_with("CARGO_") || k == "OUT_DIR")
            && k != "CARGO_HOME"
            && k != "CARGO_TARGET_DIR"
        {
            cmd.env_remove(k);
        }
    }
    let output = cmd.output().map_err(|source| Error::Spawn {
        program: script.display().to_string(),
        source,
    })?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(Error::Images {
            message: format!(
                "{} failed ({}); its stderr is above, stdout:\n{stdout}",
                script.display(),
                output.status
            ),
        });
    }
    parse(&stdout)
}

fn parse(stdout: &str) -> Result<Images> {
    let mut found = Vec::new();
    for line in stdout.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if let [name, reference, digest, archive, layout] = f.as_slice() {
            found.push(Image {
                name: name.to_string(),
                reference: reference.to_string(),
                digest: digest.to_string(),
                archive: PathBuf::from(archive),
                layout: PathBuf::from(layout),
            });
        }
    }
    let take = |name: &str| {
        found
            .iter()
            .find(|i| i.name == name)
            .cloned()
            .ok_or_else(|| Error::Images {
                message: format!("images/build.sh printed no line for {name}:\n{stdout}"),
            })
    };
    Ok(Images {
        converter: take("ckpt-convert")?,
        operator: take("ckpt-operator")?,
        converter_failpoints: take("ckpt-convert-failpoints")?,
    })
}

/// The images for this process, built once: `images/build.sh` into
/// `<target dir>/images` (the binaries are rebuilt only when stale), where the
/// target dir is `$CARGO_TARGET_DIR` or the one this test executable was
/// built into.
pub fn built_images() -> Result<Images> {
    static CACHED: Mutex<Option<Images>> = Mutex::new(None);
    let mut cached = CACHED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(images) = cached.as_ref() {
        return Ok(images.clone());
    }
    let images = build_images(&target_dir().join("images"), false)?;
    *cached = Some(images.clone());
    Ok(images)
}

/// `$CARGO_TARGET_DIR` (relative to the workspace root if relative), else the
/// target dir of this test executable, else `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        let dir = PathBuf::from(dir);
        return if dir.is_absolute() {
            dir
        } else {
            workspace_root().join(dir)
        };
    }
    if let Ok(exe) = std::env::current_exe()
        && let Some(deps) = exe.parent()
        && deps.file_name().is_some_and(|n| n == "deps")
        && let Some(profile) = deps.parent()
        && let Some(target) = profile.parent()
    {
        return target.to_path_buf();
    }
    workspace_root().join("target")
}
