//! Hostile sources (issue 11): FIFOs and devices where files should be, links
//! that leave the source, read errors, and pickles that would run code in what
//! we carry into an output. Each is refused by name, nothing is written, and no
//! run hangs (every run here is bounded by `run_bounded`).

use std::path::{Path, PathBuf};

use ckpt_convert::formats::dcp::DcpMetadata;
use ckpt_convert::synthetic::ModelShape;

use crate::util::{Replacement, Workdir, kv, replace_with, run_bounded};

/// Far above any of these runs' time; only a hang reaches it.
const BOUND: u64 = 300;

use crate::util::{nothing_written, to_hf_args as to_hf, to_megatron_args as to_megatron};

/// A sharded HF source and its Megatron conversion.
fn converted(w: &Workdir) -> (PathBuf, PathBuf) {
    let src = w.hf("src", &ModelShape::tiny_llama(), 60_000);
    run_bounded(&to_megatron(w, &src, "out"), &[], BOUND).assert_exit(0);
    (src, w.path("out/iter_0000000"))
}

/// Every file a run opens by name: a FIFO there is refused at once (an ordinary
/// open would wait for a writer forever), a link to `/dev/zero` is refused
/// (an ordinary read would never end).
#[test]
fn fifos_and_devices_in_place_of_files_are_refused() {
    for what in [Replacement::Fifo, Replacement::Link("/dev/zero".into())] {
        let says = match what {
            Replacement::Fifo => "expected a regular file, found a FIFO",
            Replacement::Link(_) => "expected a regular file, found a character device",
        };
        // HF side: config.json, the index, a shard.
        for file in [
            "config.json",
            "model.safetensors.index.json",
            "model-00002-of-00004.safetensors",
        ] {
            let w = Workdir::new();
            let src = w.hf("src", &ModelShape::tiny_llama(), 60_000);
            assert!(src.join(file).is_file(), "{file} is not in the source");
            replace_with(&src.join(file), &what);
            run_bounded(&to_megatron(&w, &src, "out"), &[], BOUND)
                .assert_exit(2)
                .stderr_has(file)
                .stderr_has(says);
            nothing_written(&w, "out");
        }
        // Megatron side: metadata.json, .metadata, a .distcp, common.pt,
        // run_config.yaml, and the tracker of a run directory.
        for file in [
            "metadata.json",
            ".metadata",
            "__0_0.distcp",
            "common.pt",
            "run_config.yaml",
        ] {
            let w = Workdir::new();
            let (src, iter) = converted(&w);
            replace_with(&iter.join(file), &what);
            run_bounded(&to_hf(&w, &iter, &src), &[], BOUND)
                .assert_exit(2)
                .stderr_has(file)
                .stderr_has(says);
            nothing_written(&w, "back");
        }
        let w = Workdir::new();
        let (src, _) = converted(&w);
        let tracker = w.path("out/latest_checkpointed_iteration.txt");
        replace_with(&tracker, &what);
        run_bounded(&to_hf(&w, &w.path("out"), &src), &[], BOUND)
            .assert_exit(2)
            .stderr_has("latest_checkpointed_iteration.txt")
            .stderr_has(says);
    }
}

/// A read error is an error, not "absent": `metadata.json` failing with EIO
/// used to be skipped and the run published.
#[cfg(feature = "failpoints")]
#[test]
fn a_read_error_fails_the_run_naming_the_file() {
    let w = Workdir::new();
    let (src, iter) = converted(&w);
    for file in [
        "metadata.json",
        "config.json",
        "model-00001-of-00004.safetensors",
    ] {
        let args = if file == "metadata.json" {
            to_hf(&w, &iter, &src)
        } else {
            to_megatron(&w, &src, "out2")
        };
        let mut cmd = crate::util::bin();
        let out = cmd
            .args(&args)
            .env("CKPT_CONVERT_FAIL_READ", file)
            .output()
            .unwrap();
        let r = crate::util::Run { out };
        r.assert_exit(2)
            .stderr_has(file)
            .stderr_has("Input/output error");
        nothing_written(&w, "back");
        nothing_written(&w, "out2");
    }
}

#[cfg(not(feature = "failpoints"))]
#[test]
fn a_read_error_fails_the_run_naming_the_file() {
    panic!(
        "this test needs the failpoints feature: cargo test --features failpoints (the repository's test command passes it)"
    );
}

/// A side file that is a link to a file outside the source is refused, naming
/// the link: its contents would otherwise be published with the output.
#[test]
fn side_files_linking_outside_the_source_are_refused() {
    let w = Workdir::new();
    let (src, iter) = converted(&w);
    std::fs::write(w.path("secret.json"), b"{\"token\": \"hunter2\"}").unwrap();
    replace_with(
        &src.join("tokenizer.json"),
        &Replacement::Link(w.path("secret.json")),
    );
    for (args, out) in [
        (to_hf(&w, &iter, &src), "back"),
        (to_megatron(&w, &src, "out2"), "out2"),
    ] {
        run_bounded(&args, &[], BOUND)
            .assert_exit(2)
            .stderr_has("tokenizer.json: is a link to")
            .stderr_has("secret.json");
        nothing_written(&w, out);
    }
    // A relative link that climbs out is the same.
    replace_with(
        &src.join("tokenizer.json"),
        &Replacement::Link("../secret.json".into()),
    );
    run_bounded(&to_hf(&w, &iter, &src), &[], BOUND)
        .assert_exit(2)
        .stderr_has("tokenizer.json: is a link to");
}

/// The Hugging Face cache's own layout (`snapshots/<rev>/f -> ../../blobs/<hash>`)
/// stays allowed: a model id resolved from the cache converts, and its tokenizer
/// travels.
#[test]
fn hf_cache_snapshot_links_into_blobs_are_followed() {
    let w = Workdir::new();
    let src = w.hf("src", &ModelShape::tiny_llama(), 60_000);
    let repo = w.path("hub/models--org--tiny");
    let snap = repo.join("snapshots/0123abcd");
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        let blob = format!("sha-{}", e.file_name().to_string_lossy());
        std::fs::copy(e.path(), repo.join("blobs").join(&blob)).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/{blob}"), snap.join(e.file_name()))
            .unwrap();
    }
    let args = [
        "run".to_owned(),
        "convert/hf_to_megatron".into(),
        "hf_model_id=org/tiny".into(),
        kv("megatron_path", &w.path("out")),
    ];
    run_bounded(&args, &[("HF_HUB_CACHE", &w.path("hub"))], BOUND).assert_exit(0);
    assert_eq!(
        std::fs::read(w.path("out/iter_0000000/tokenizer/tokenizer.json")).unwrap(),
        std::fs::read(src.join("tokenizer.json")).unwrap()
    );
}

/// Points the first bytes item (`_extra_state`) of `iter` at `payload`, in a
/// data file of its own, as a producer would have saved it.
fn with_bytes_item(iter: &Path, payload: &[u8]) -> String {
    let md_path = iter.join(".metadata");
    let mut md = DcpMetadata::parse(&std::fs::read(&md_path).unwrap()).unwrap();
    let entry = md
        .bytes
        .iter_mut()
        .find(|b| b.fqn.contains("_extra_state"))
        .expect("the converted checkpoint has _extra_state items");
    std::fs::write(iter.join("__9_0.distcp"), payload).unwrap();
    entry.storage.relative_path = "__9_0.distcp".into();
    entry.storage.offset = 0;
    entry.storage.length = payload.len() as u64;
    let fqn = entry.fqn.clone();
    std::fs::write(&md_path, md.to_bytes()).unwrap();
    fqn
}

fn hostile(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/hostile")
            .join(name),
    )
    .unwrap()
}

/// `_extra_state` payloads made by torch.save (tests/data/hostile/make.py) whose
/// pickles call `os.system` (directly; as TransformerEngine FP8 metadata in a
/// uint8 tensor; inside an older TransformerEngine BytesIO) fail the same
/// allow-list as what we read: `inspect` says so by name, and an export, which
/// does not carry bytes items, skips them.
#[test]
fn extra_state_pickles_that_call_code_are_named() {
    for file in [
        "extra_state_os_system.pt",
        "extra_state_uint8_os_system.pt",
        "extra_state_bytesio_os_system.pt",
    ] {
        let w = Workdir::new();
        let (src, iter) = converted(&w);
        let fqn = with_bytes_item(&iter, &hostile(file));
        let inspect = [
            "inspect".to_owned(),
            iter.display().to_string(),
            "--json".into(),
        ];
        let r = run_bounded(&inspect, &[], BOUND);
        r.assert_exit(0);
        let v: serde_json::Value = serde_json::from_str(&r.stdout()).unwrap();
        let item = v["byte_items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == fqn.as_str())
            .unwrap()
            .clone();
        let payload = item["payload"].as_str().unwrap();
        assert!(
            payload.contains("refused, would not be carried into an output")
                && payload.contains("posix.system"),
            "{payload}"
        );
        run_bounded(&to_hf(&w, &iter, &src), &[], BOUND).assert_exit(0);
    }
}

/// The case: a Megatron-Bridge base whose `_extra_state` holds a pickle
/// calling `os.system` (plainly, as TransformerEngine FP8 metadata, inside an
/// older TransformerEngine BytesIO) used to merge, validate and publish with that
/// pickle in the merged checkpoint. Now the merge is refused naming the data
/// file, the item and the global, and nothing is written; the same base with a
/// real payload of each shape merges.
#[test]
fn a_bridge_merge_into_a_base_with_hostile_extra_state_is_refused() {
    let refs = crate::util::bridge_refs();
    let case = refs.join("llama");
    for (file, hostile_payload) in [
        ("extra_state_os_system.pt", true),
        ("extra_state_uint8_os_system.pt", true),
        ("extra_state_bytesio_os_system.pt", true),
        ("extra_state_te_empty.pt", false),
        ("extra_state_bytesio_tensors.pt", false),
        ("extra_state_uint8_plain.pt", false),
    ] {
        let w = Workdir::new();
        crate::util::copy_tree(&case.join("bridge_import"), &w.path("base"));
        let iter = w.path("base/iter_0000000");
        let fqn = with_bytes_item(&iter, &hostile(file));
        let r = run_bounded(
            &[
                "run".to_owned(),
                "convert/merge_lora".into(),
                kv("lora_checkpoint", &case.join("lora")),
                kv("base_megatron_path", &iter),
                kv("output_megatron_path", &w.path("merged-mg")),
                kv("output_hf_path", &w.path("merged-hf")),
                kv("hf_model_id", &case.join("hf")),
            ],
            &[],
            BOUND,
        );
        if hostile_payload {
            r.assert_exit(2)
                .stderr_has("__9_0.distcp")
                .stderr_has(&fqn)
                .stderr_has("cannot be carried into the output")
                .stderr_has("posix.system");
            nothing_written(&w, "merged-mg");
            nothing_written(&w, "merged-hf");
        } else {
            r.assert_exit(0);
        }
    }
}
