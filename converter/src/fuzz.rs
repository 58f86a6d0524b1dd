//! The entry points of the fuzz targets (`converter/fuzz/`), one per reader of
//! untrusted bytes, shared with the test that replays every checked-in corpus
//! file on stable Rust (`tests/it/fuzz_corpus.rs`).
//!
//! Each takes any bytes and must return: a refusal is fine, a panic, a hang or an
//! allocation out of proportion to the input is a bug (the fuzz runs cap memory
//! and time per input). Where a reader has a writer, what was accepted must also
//! survive a round trip, which these functions assert (a failed assertion is a
//! bug the fuzzer reports like a crash).

use std::path::Path;

use crate::formats::dcp::{self, DcpMetadata};
use crate::formats::dtype::DType;
use crate::formats::pickle::{AllowList, Pickle};
use crate::formats::{hf, megatron, safetensors, torch_save, torch_zip, yaml};

/// Every target by name, as `converter/fuzz/fuzz_targets/<name>.rs` calls it and
/// `converter/fuzz/corpus/<name>/` seeds it.
pub const TARGETS: &[(&str, Target)] = &[
    ("pickle", pickle),
    ("torch_zip", torch_zip),
    ("torch_save", torch_save),
    ("dcp_metadata", dcp_metadata),
    ("safetensors", safetensors),
    ("hf_index", hf_index),
    ("yaml", yaml),
    ("peft_config", peft_config),
    ("bridge_config", bridge_config),
    ("summary", summary),
];

/// An entry point: any bytes in, a panic only for a bug.
pub type Target = fn(&[u8]);

const PATH: &str = "fuzz-input";

/// The pickle machine under every allow-list the readers use.
pub fn pickle(data: &[u8]) {
    for allow in [
        dcp::metadata_allow_list(),
        torch_save::tensor_allow_list(),
        AllowList::new(&[]),
    ] {
        if let Ok(p) = Pickle::parse(data, &allow) {
            // One node per opcode at most, and every opcode takes a byte.
            assert!(p.ids().len() <= data.len(), "arena larger than the input");
            let _ = p.describe(p.root(), 6);
            for id in p.ids() {
                let _ = p.as_dims(id);
            }
        }
    }
}

/// The zip directory of a `torch.save` archive: every record it lists lies inside
/// the archive.
pub fn torch_zip(data: &[u8]) {
    if let Ok(records) = torch_zip::read_records(data) {
        for r in records {
            let end = r.data_offset.checked_add(r.size);
            assert!(
                end.is_some_and(|e| e <= data.len() as u64),
                "record {:?} outside the archive",
                r.name
            );
        }
    }
}

/// A `torch.save` archive as every reader takes one: a tensor item, a bytes item
/// carried into outputs, common state.
pub fn torch_save(data: &[u8]) {
    if let Ok(a) = torch_save::Archive::open(data)
        && let Ok(p) = a.pickle(&torch_save::tensor_allow_list())
    {
        for id in p.ids() {
            if let Ok(t) = a.tensor(&p, id)
                && let Some((off, len)) = t.contiguous_range()
            {
                let end = off.checked_add(len);
                assert!(
                    end.is_some_and(|e| e <= data.len() as u64),
                    "tensor outside the archive"
                );
            }
        }
    }
    let _ = megatron::check_carried(data, 0);
    let _ = megatron::describe_bytes_item(data);
}

/// A DCP `.metadata`: what is accepted is covered exactly by its chunks, each
/// with a storage item of its own, and what we write from it reads back the same.
pub fn dcp_metadata(data: &[u8]) {
    if let Ok(md) = DcpMetadata::parse(data) {
        for t in &md.tensors {
            dcp::check_coverage(t).expect("accepted tensors are covered");
            let mut offsets: Vec<_> = t.chunks.iter().map(|c| &c.offsets).collect();
            offsets.sort();
            let n = offsets.len();
            offsets.dedup();
            assert_eq!(offsets.len(), n, "two chunks share one storage item");
        }
        let again = DcpMetadata::parse(&md.to_bytes()).expect("what we write is read back");
        assert_eq!(md, again, "round trip through our writer");
    }
}

/// A safetensors file: accepted tensors tile the data section exactly, and the
/// header we would write for them reads back with the same tensors.
pub fn safetensors(data: &[u8]) {
    let Ok(f) = safetensors::parse(data, Path::new(PATH), 0) else {
        return;
    };
    let mut end = f.header_len;
    for t in &f.tensors {
        let crate::formats::source::ChunkData::Contiguous(r) = &t.chunks[0].data else {
            panic!("a safetensors tensor is one contiguous run");
        };
        assert_eq!(r.offset, end, "tensors leave a hole or overlap");
        assert_eq!(r.len, t.nbytes(), "length disagrees with shape and dtype");
        end = r.offset + r.len;
    }
    assert_eq!(
        end,
        data.len() as u64,
        "data does not end at the file's end"
    );
    let specs: Vec<(String, DType, Vec<u64>)> = f
        .tensors
        .iter()
        .map(|t| (t.name.clone(), t.dtype, t.shape.clone()))
        .collect();
    let layout = safetensors::layout(&specs, &f.metadata).expect("a layout of accepted tensors");
    let mut bytes = layout.header.clone();
    bytes.resize(layout.file_len as usize, 0);
    let again =
        safetensors::parse(&bytes, Path::new(PATH), 0).expect("the header we write is read back");
    let key = |f: &safetensors::SafetensorsFile| {
        let mut v: Vec<_> = f
            .tensors
            .iter()
            .map(|t| (t.name.clone(), t.dtype, t.shape.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    assert_eq!(key(&f), key(&again), "round trip through our layout");
    assert_eq!(f.metadata, again.metadata, "metadata round trip");
}

/// `model.safetensors.index.json`: shards are plain file names.
pub fn hf_index(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok((map, _)) = hf::parse_index(text, Path::new(PATH)) {
        for shard in map.values() {
            assert!(
                !shard.contains('/') && !shard.contains(".."),
                "{shard:?} accepted"
            );
        }
    }
}

/// YAML (`run_config.yaml`), and what each reader takes from it.
pub fn yaml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(v) = yaml::parse(text) {
        let _ = crate::reference::Arch::from_run_config(&v);
        let _ = crate::lora::megatron_bridge::QkvLayout::from_run_config(&v);
        let _ = serde_json::to_string(&v).expect("a parsed document serializes");
    }
}

/// A PEFT `adapter_config.json`, and its patterns matched against module names
/// (a pattern that backtracks without end would hang the merge).
pub fn peft_config(data: &[u8]) {
    if let Ok(serde_json::Value::Object(obj)) = serde_json::from_slice(data)
        && let Ok(c) = crate::lora::peft::AdapterConfig::from_json(Path::new(PATH), &obj)
    {
        for module in [
            "model.layers.0.self_attn.q_proj",
            "model.layers.11.mlp.down_proj",
            "model.embed_tokens",
            "lm_head",
            "base_model.model.model.layers.3.self_attn.v_proj",
        ] {
            let _ = c.targets(module, true, "llama");
            let _ = c.rank_and_alpha(module);
            let _ = c.inside_modules_to_save(module);
            let _ = c.token_indices(module, module.contains("embed"));
        }
    }
}

/// A Megatron-Bridge adapter's `run_config.yaml` (read from a file, as the merge
/// reads it).
pub fn bridge_config(data: &[u8]) {
    thread_local! {
        static DIR: tempfile_dir::Dir = tempfile_dir::Dir::new();
    }
    DIR.with(|d| {
        let path = d.path().join("run_config.yaml");
        if std::fs::write(&path, data).is_ok() {
            let _ = crate::lora::megatron_bridge::BridgeConfig::read(d.path());
        }
    });
}

/// The termination summary the operator parses: what it accepts it can write
/// back within the kubelet's limit, and read again the same.
pub fn summary(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(s) = ckpt_wire::Summary::parse(text) {
        let json = s.to_json();
        assert!(
            json.len() <= ckpt_wire::summary::MAX_BYTES,
            "summary too long"
        );
        let again = ckpt_wire::Summary::parse(&json).expect("what we write is read back");
        if json.len() < ckpt_wire::summary::MAX_BYTES / 2 {
            assert_eq!(again.to_json(), json, "round trip");
        }
    }
}

/// A directory for the targets that read files, removed when the thread ends.
mod tempfile_dir {
    use std::path::{Path, PathBuf};

    pub struct Dir(PathBuf);

    impl Dir {
        pub fn new() -> Dir {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            let p = std::env::temp_dir().join(format!(
                "ckpt-fuzz-{}-{nanos}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            std::fs::create_dir_all(&p).expect("a temporary directory");
            Dir(p)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
