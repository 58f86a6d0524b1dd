//! The operator knows the converter only through its wire types (the step
//! vocabulary it renders into Job arguments, the summary it parses from the
//! termination message): it never opens a checkpoint. This keeps it so.

use std::path::{Path, PathBuf};

#[test]
fn the_operator_does_not_depend_on_the_converter() {
    let manifest =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml")).unwrap();
    let deps: toml_like::Deps = toml_like::deps(&manifest);
    assert!(
        !deps.iter().any(|d| d == "ckpt-convert"),
        "operator/Cargo.toml depends on ckpt-convert: the operator must talk to the converter through Job arguments and the termination summary only"
    );
    for (path, text) in sources() {
        for word in [
            "ckpt_convert",
            "safetensors::",
            "memmap2",
            "formats::",
            "execute::",
            "publish::",
        ] {
            assert!(
                !text.contains(word),
                "{} names {word}: checkpoint formats belong to the converter",
                path.display()
            );
        }
    }
}

/// Every file under `operator/src`, with its text.
fn sources() -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    let mut stack = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("src")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let text = std::fs::read_to_string(&path).unwrap();
                out.push((path, text));
            }
        }
    }
    out
}

/// Steps and artifact kinds are the converter's enums (`ckpt_wire`), never spelled
/// again in the operator's code (its tests may quote them).
#[test]
fn step_and_kind_names_are_not_copied() {
    for (path, text) in sources() {
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        for (n, line) in code.lines().enumerate() {
            let line = line.trim_start();
            if line.starts_with("//") {
                continue;
            }
            for word in ["\"convert/", "\"checkpoint_"] {
                assert!(
                    !line.contains(word),
                    "{}:{}: {line}: use ckpt_wire::Step and ckpt_wire::ArtifactKind",
                    path.display(),
                    n + 1
                );
            }
        }
    }
}

/// Just enough of Cargo.toml: the names in `[dependencies]`.
mod toml_like {
    pub type Deps = Vec<String>;

    pub fn deps(manifest: &str) -> Deps {
        let mut out = Vec::new();
        let mut inside = false;
        for line in manifest.lines() {
            let line = line.trim();
            if line.starts_with('[') {
                inside = line == "[dependencies]";
                continue;
            }
            if inside && let Some((name, _)) = line.split_once('=') {
                out.push(name.trim().to_owned());
            }
        }
        out
    }
}
