//! The converter's layers point one way: a module names only modules of its own
//! layer or below (`formats → plan → models/lora → execute → publish → validate →
//! pipeline → steps`; the binary's `cli` sits above all). This reads every source
//! file and fails on the first reference that points up.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Each top-level module of the library and its layer.
const LAYERS: &[(&str, u32)] = &[
    ("formats", 0),
    ("paths", 0),
    ("failpoint", 0),
    ("plan", 1),
    ("synthetic", 1),
    ("models", 2),
    ("lora", 2),
    ("execute", 3),
    ("publish", 4),
    ("reference", 5),
    ("smoke", 5),
    ("validate", 5),
    ("pipeline", 6),
    ("steps", 7),
    ("inspect", 7),
    ("fuzz", 7),
];

fn rank(module: &str) -> Option<u32> {
    LAYERS.iter().find(|(m, _)| *m == module).map(|(_, r)| *r)
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Code without comments (line comments and doc comments; the converter has no
/// block comments), so a doc link may mention any module.
fn code(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) if !l[..i].contains('"') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top-level modules a file names as `crate::m`.
fn references(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        out.push(name);
    }
    out
}

#[test]
fn layers_point_one_way() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&root, &mut files);
    let mut problems = Vec::new();
    let mut seen: BTreeMap<String, u32> = BTreeMap::new();
    for f in &files {
        let rel = f.strip_prefix(&root).unwrap();
        let top = rel.iter().next().unwrap().to_string_lossy().into_owned();
        let top = top.trim_end_matches(".rs").to_owned();
        if matches!(top.as_str(), "lib" | "main" | "cli") {
            continue;
        }
        let Some(own) = rank(&top) else {
            problems.push(format!(
                "{}: module {top} has no layer in tests/it/layers.rs",
                rel.display()
            ));
            continue;
        };
        seen.insert(top.clone(), own);
        for r in references(&code(&std::fs::read_to_string(f).unwrap())) {
            match rank(&r) {
                Some(other) if other > own => problems.push(format!(
                    "{}: {top} (layer {own}) names crate::{r} (layer {other})",
                    rel.display()
                )),
                Some(_) => {}
                None if r == "Error" => problems.push(format!(
                    "{}: names crate::Error, the composed error of the pipeline layer",
                    rel.display()
                )),
                None => {}
            }
        }
    }
    assert!(
        problems.is_empty(),
        "layers point up:\n{}",
        problems.join("\n")
    );
    // The table lists no module that is gone.
    for (m, _) in LAYERS {
        assert!(
            seen.contains_key(*m),
            "tests/it/layers.rs lists {m}, which has no source"
        );
    }
}

/// Profiles and the Kubernetes and Slurm executors are the binary's: the library
/// names no cluster client, so it stays usable (and builds the same) without one.
#[test]
fn the_library_names_no_cluster_client() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&root, &mut files);
    for f in &files {
        let rel = f.strip_prefix(&root).unwrap();
        let top = rel.iter().next().unwrap().to_string_lossy().into_owned();
        if matches!(top.as_str(), "main.rs" | "cli") {
            continue;
        }
        let text = code(&std::fs::read_to_string(f).unwrap());
        for word in ["ckpt_batch", "kube::", "k8s_openapi", "tokio"] {
            assert!(
                !text.contains(word),
                "{}: the library names {word}; cluster clients belong to the binary (cli/)",
                rel.display()
            );
        }
    }
}
