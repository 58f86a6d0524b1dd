//! The images `images/build.sh` makes: reproducible, accepted by skopeo,
//! nothing but the binary, and the converter's runs under runc as user 65532
//! with a read-only root filesystem and a read-only source.
//!
//! Needs root, skopeo, umoci and runc (the test command installs them:
//! `apt-get install skopeo umoci runc`), plus what images/build.sh needs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, Result, bail, ensure};
use ckpt_testcluster::IMAGE_USER;
use ckpt_testcluster::images::{Image, Images, build_images, built_images, target_dir};
use serde_json::Value;

fn need(program: &str) -> Result<()> {
    let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .any(|d| d.join(program).is_file());
    ensure!(
        found,
        "{program} not found in PATH: apt-get install -y skopeo umoci runc (run-tests.sh does)"
    );
    Ok(())
}

fn run(program: &str, args: &[&str]) -> Result<Output> {
    Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))
}

fn ok(program: &str, args: &[&str]) -> Result<String> {
    let out = run(program, args)?;
    ensure!(
        out.status.success(),
        "{program} {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Every file under `dir` with its bytes, sorted by path.
fn files(dir: &Path) -> Result<Vec<(PathBuf, Vec<u8>)>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.strip_prefix(dir)?.to_path_buf(), std::fs::read(&p)?));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Builds twice into two directories (the second time with the binaries of
/// the first): same digests, byte-identical archives and layouts.
#[test]
fn images_are_byte_identical_when_built_twice() -> Result<()> {
    let first = built_images()?;
    let again = tempfile::Builder::new()
        .prefix("ckpt-images-")
        .tempdir_in(target_dir())?;
    let second = build_images(again.path(), true)?;
    for (a, b) in [
        (&first.converter, &second.converter),
        (&first.operator, &second.operator),
        (&first.converter_failpoints, &second.converter_failpoints),
    ] {
        assert_eq!(a.reference, b.reference);
        assert_eq!(a.digest, b.digest, "{}: digests differ", a.name);
        assert!(
            std::fs::read(&a.archive)? == std::fs::read(&b.archive)?,
            "{}: {} and {} differ",
            a.name,
            a.archive.display(),
            b.archive.display()
        );
        assert!(
            files(&a.layout)? == files(&b.layout)?,
            "{}: the layouts {} and {} differ",
            a.name,
            a.layout.display(),
            b.layout.display()
        );
    }
    Ok(())
}

fn inspect(image: &Image, what: &[&str]) -> Result<Value> {
    need("skopeo")?;
    let target = format!("oci-archive:{}", image.archive.display());
    let mut args = vec!["inspect"];
    args.extend_from_slice(what);
    args.push(&target);
    Ok(serde_json::from_str(&ok("skopeo", &args)?)?)
}

/// skopeo reads both archives; labels, user, entrypoint and the one layer
/// holding only the binary are as documented.
#[test]
fn skopeo_accepts_the_images_and_they_hold_only_the_binary() -> Result<()> {
    let Images {
        converter,
        operator,
        ..
    } = built_images()?;
    let revision = ok("git", &["rev-parse", "HEAD"])?;
    for (image, binary) in [(&converter, "ckpt-convert"), (&operator, "ckpt-operator")] {
        let info = inspect(image, &[])?;
        assert_eq!(info["Digest"], image.digest.as_str(), "{info:#}");
        assert_eq!(info["Os"], "linux");
        let labels = &info["Labels"];
        assert!(
            labels["org.opencontainers.image.source"]
                .as_str()
                .is_some_and(|s| s.starts_with("https://")),
            "{labels:#}"
        );
        assert!(
            labels["org.opencontainers.image.revision"]
                .as_str()
                .is_some_and(|r| r.starts_with(revision.trim())),
            "{labels:#} (HEAD is {revision})"
        );
        assert_eq!(
            labels["org.opencontainers.image.version"],
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(info["Layers"].as_array().map(Vec::len), Some(1), "{info:#}");

        let config = inspect(image, &["--config"])?;
        assert_eq!(config["config"]["User"], "65532:65532", "{config:#}");
        assert_eq!(
            config["config"]["Entrypoint"],
            serde_json::json!([format!("/{binary}")])
        );

        // The layer: exactly the binary, root-owned, not writable.
        let layer = info["Layers"][0].as_str().context("layer digest")?;
        let blob = image
            .layout
            .join("blobs/sha256")
            .join(layer.trim_start_matches("sha256:"));
        let listing = ok(
            "tar",
            &["--numeric-owner", "-tvzf", &blob.display().to_string()],
        )?;
        let entries: Vec<&str> = listing.lines().collect();
        assert_eq!(entries.len(), 1, "{listing}");
        let f: Vec<&str> = entries[0].split_whitespace().collect();
        assert_eq!(f[0], "-r-xr-xr-x", "{listing}");
        assert_eq!(f[1], "0/0", "{listing}");
        assert_eq!(f.last().copied(), Some(binary), "{listing}");
    }
    // The README's way into `docker load`: a docker-archive with the image's name.
    let dir = tempfile::tempdir()?;
    let docker = dir.path().join("ckpt-convert.docker.tar");
    ok(
        "skopeo",
        &[
            "copy",
            &format!("oci-archive:{}", converter.archive.display()),
            &format!(
                "docker-archive:{}:{}",
                docker.display(),
                converter.reference
            ),
        ],
    )?;
    let manifest: Value = serde_json::from_str(&ok(
        "tar",
        &["-xOf", &docker.display().to_string(), "manifest.json"],
    )?)?;
    assert_eq!(
        manifest[0]["RepoTags"],
        serde_json::json!([converter.reference]),
        "{manifest:#}"
    );
    // The operator serves metrics on 8080.
    let config = inspect(&operator, &["--config"])?;
    assert!(
        config["config"]["ExposedPorts"]["8080/tcp"].is_object(),
        "{config:#}"
    );
    Ok(())
}

/// The binaries in the images name no directory of the machine that built
/// them (the workspace, the target dir, cargo's or rustup's home), so the
/// same commit built elsewhere gives the same bytes.
#[test]
fn binaries_carry_no_build_paths() -> Result<()> {
    let images = built_images()?;
    let home = std::env::var("HOME").unwrap_or_default();
    let workspace = ckpt_testcluster::workspace_root();
    let needles = [
        workspace.display().to_string(),
        target_dir().display().to_string(),
        format!("{home}/.cargo"),
        format!("{home}/.rustup"),
    ];
    for image in [&images.converter, &images.operator] {
        let binary = target_dir()
            .join(format!(
                "{}-unknown-linux-musl/release",
                std::env::consts::ARCH
            ))
            .join(&image.name);
        let bytes = std::fs::read(&binary).with_context(|| binary.display().to_string())?;
        for needle in &needles {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
                "{} contains the build path {needle}",
                binary.display()
            );
        }
    }
    Ok(())
}

/// An unpacked converter image run by runc, as a node would run it.
struct Bundle {
    dir: tempfile::TempDir,
    config: Value,
}

impl Bundle {
    fn unpack(image: &Image) -> Result<Bundle> {
        need("umoci")?;
        need("runc")?;
        let dir = tempfile::Builder::new().prefix("ckpt-bundle-").tempdir()?;
        let bundle = dir.path().join("bundle");
        let tag = image.reference.rsplit(':').next().context("tag")?;
        ok(
            "umoci",
            &[
                "unpack",
                "--image",
                &format!("{}:{tag}", image.layout.display()),
                &bundle.display().to_string(),
            ],
        )?;
        let config: Value = serde_json::from_slice(&std::fs::read(bundle.join("config.json"))?)?;
        Ok(Bundle { dir, config })
    }

    /// Runs the image's entrypoint with `args` and two bind mounts: `source`
    /// read-only at /src, `target` read-write at /out; root filesystem
    /// read-only. Returns the exit code and the output.
    fn run(&self, id: &str, args: &[&str], source: &Path, target: &Path) -> Result<(i32, String)> {
        let mut config = self.config.clone();
        let mut argv = config["process"]["args"]
            .as_array()
            .cloned()
            .context("process.args")?;
        argv.extend(args.iter().map(|a| Value::from(*a)));
        config["process"]["args"] = Value::from(argv);
        config["process"]["terminal"] = Value::from(false);
        config["root"]["readonly"] = Value::from(true);
        let mounts = config["mounts"].as_array_mut().context("mounts")?;
        for (src, dst, mode) in [(source, "/src", "ro"), (target, "/out", "rw")] {
            mounts.push(serde_json::json!({
                "destination": dst,
                "type": "bind",
                "source": src.display().to_string(),
                "options": ["rbind", mode, "nosuid", "nodev"],
            }));
        }
        let bundle = self.dir.path().join("bundle");
        std::fs::write(
            bundle.join("config.json"),
            serde_json::to_vec_pretty(&config)?,
        )?;
        let state = self.dir.path().join("runc-state");
        let out = run(
            "runc",
            &[
                "--root",
                &state.display().to_string(),
                "run",
                "--bundle",
                &bundle.display().to_string(),
                id,
            ],
        )?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok((out.status.code().unwrap_or(-1), text))
    }
}

fn uid_of(p: &Path) -> Result<u32> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(p)?.uid())
}

fn demo_source(dir: &Path) -> Result<PathBuf> {
    // The image's own binary, run on the host, writes the fixture.
    let binary = target_dir()
        .join(format!(
            "{}-unknown-linux-musl/release",
            std::env::consts::ARCH
        ))
        .join("ckpt-convert");
    let scratch = dir.join("scratch");
    let out = Command::new(&binary)
        .arg("demo")
        .arg("--dir")
        .arg(&scratch)
        .output()?;
    ensure!(
        out.status.success(),
        "{} demo: {}",
        binary.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let source = dir.join("source");
    std::fs::create_dir(&source)?;
    std::fs::rename(scratch.join("hf-source"), source.join("hf"))?;
    // Writable by the image's user as far as permissions go: only the
    // read-only mount may stop a write.
    ckpt_testcluster::chown_tree(&source, IMAGE_USER)?;
    Ok(source)
}

#[test]
fn converter_image_converts_under_runc_as_65532_and_writes_only_its_target() -> Result<()> {
    let images = built_images()?;
    let bundle = Bundle::unpack(&images.converter)?;
    let work = tempfile::Builder::new().prefix("ckpt-runc-").tempdir()?;
    let source = demo_source(work.path())?;
    let target = work.path().join("target");
    std::fs::create_dir(&target)?;
    ckpt_testcluster::chown_tree(&target, IMAGE_USER)?;
    let before = files(&source)?;

    let id = format!("ckpt-images-test-{}", std::process::id());
    let (code, out) = bundle.run(
        &format!("{id}-ok"),
        &[
            "run",
            "convert/hf_to_megatron",
            "hf_model_id=/src/hf",
            "megatron_path=/out/megatron",
            "--json",
        ],
        &source,
        &target,
    )?;
    ensure!(code == 0, "the conversion failed ({code}):\n{out}");
    let written = target.join("megatron/latest_checkpointed_iteration.txt");
    assert!(written.is_file(), "no {}:\n{out}", written.display());
    // Files created by the container belong to the image's user.
    assert_eq!(uid_of(&written)?, IMAGE_USER);
    assert_eq!(uid_of(&target.join("megatron"))?, IMAGE_USER);

    // A target on the root filesystem: the image's root is read-only.
    let (code, out) = bundle.run(
        &format!("{id}-root"),
        &[
            "run",
            "convert/hf_to_megatron",
            "hf_model_id=/src/hf",
            "megatron_path=/megatron",
        ],
        &source,
        &target,
    )?;
    assert_ne!(
        code, 0,
        "writing into the root filesystem succeeded:\n{out}"
    );
    assert!(
        out.to_lowercase().contains("read-only file system"),
        "{out}"
    );

    // A target beside the input on the read-only source mount (not inside the
    // input, which the converter itself refuses): the kernel refuses the write.
    let (code, out) = bundle.run(
        &format!("{id}-src"),
        &[
            "run",
            "convert/hf_to_megatron",
            "hf_model_id=/src/hf",
            "megatron_path=/src/megatron",
        ],
        &source,
        &target,
    )?;
    assert_ne!(
        code, 0,
        "writing into the read-only source succeeded:\n{out}"
    );
    assert!(
        out.to_lowercase().contains("read-only file system"),
        "{out}"
    );
    if files(&source)? != before {
        bail!("the source changed");
    }
    Ok(())
}
