//! Bad inputs: each gives a clear error naming the file (and tensor), exit 2 or
//! 1, no panic, and nothing written.

use std::path::Path;

use ckpt_convert::formats::pickle::{Py, write_pickle};
use ckpt_convert::synthetic::ModelShape;

use crate::util::{Workdir, nothing_written, run};

fn to_megatron(w: &Workdir, src: &Path) -> crate::util::Run {
    run(&crate::util::to_megatron_args(w, src, "out"))
}

fn to_hf(w: &Workdir, iter: &Path, hf: &Path) -> crate::util::Run {
    run(&crate::util::to_hf_args(w, iter, hf))
}

/// Writes a one-file safetensors checkpoint with a hand-made header.
fn hand_made(w: &Workdir, header: &str, data_len: usize) -> std::path::PathBuf {
    let dir = w.path("src");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        ModelShape::tiny_llama().config_json(),
    )
    .unwrap();
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend(std::iter::repeat_n(0u8, data_len));
    std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
    dir
}

#[test]
fn truncated_safetensors() {
    let w = Workdir::new();
    let src = w.hf("src", &ModelShape::tiny_llama(), 60_000);
    let ckpt = ckpt_convert::formats::hf::HfCheckpoint::open(&src).unwrap();
    assert!(ckpt.shards.len() > 1, "expected a sharded checkpoint");
    let name = ckpt.shards[0].clone();
    drop(ckpt);
    let shard = src.join(&name);
    let len = std::fs::metadata(&shard).unwrap().len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&shard)
        .unwrap();
    f.set_len(len - 10).unwrap();
    to_megatron(&w, &src)
        .assert_exit(2)
        .stderr_has(&name)
        .stderr_has("truncated");
    nothing_written(&w, "out");
}

#[test]
fn header_offsets_beyond_the_file() {
    let w = Workdir::new();
    let src = hand_made(
        &w,
        r#"{"model.embed_tokens.weight":{"dtype":"BF16","shape":[128,64],"data_offsets":[0,16384]}}"#,
        100,
    );
    to_megatron(&w, &src)
        .assert_exit(2)
        .stderr_has("model.safetensors")
        .stderr_has("does not end exactly");
    nothing_written(&w, "out");
}

#[test]
fn overlapping_offsets() {
    let w = Workdir::new();
    let src = hand_made(
        &w,
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
        12,
    );
    to_megatron(&w, &src)
        .assert_exit(2)
        .stderr_has("model.safetensors")
        .stderr_has("overlap");
    nothing_written(&w, "out");
}

#[test]
fn unknown_dtype() {
    let w = Workdir::new();
    let src = hand_made(
        &w,
        r#"{"a":{"dtype":"Q7","shape":[2],"data_offsets":[0,2]}}"#,
        2,
    );
    to_megatron(&w, &src)
        .assert_exit(2)
        .stderr_has("model.safetensors")
        .stderr_has("Q7");
    nothing_written(&w, "out");
}

#[test]
fn missing_shard_named_in_the_index() {
    let w = Workdir::new();
    let src = w.hf("src", &ModelShape::tiny_llama(), 60_000);
    let shards = ckpt_convert::formats::hf::HfCheckpoint::open(&src)
        .unwrap()
        .shards;
    std::fs::remove_file(src.join(&shards[1])).unwrap();
    to_megatron(&w, &src)
        .assert_exit(2)
        .stderr_has("model.safetensors.index.json")
        .stderr_has(&format!("shard {:?} named in the index", shards[1]));
    nothing_written(&w, "out");
}

fn converted(w: &Workdir) -> (std::path::PathBuf, std::path::PathBuf) {
    let src = w.hf("src", &ModelShape::tiny_llama(), 1 << 30);
    to_megatron(w, &src).assert_exit(0);
    (src, w.path("out/iter_0000000"))
}

#[test]
fn metadata_naming_a_forbidden_global() {
    let w = Workdir::new();
    let (src, iter) = converted(&w);
    let evil = write_pickle(&Py::reduce(
        Py::global("os", "system"),
        vec![Py::str("touch /tmp/pwned")],
    ));
    std::fs::write(iter.join(".metadata"), evil).unwrap();
    to_hf(&w, &iter, &src)
        .assert_exit(2)
        .stderr_has(".metadata")
        .stderr_has("os.system");
    nothing_written(&w, "back");
}

#[test]
fn distcp_shorter_than_its_item() {
    let w = Workdir::new();
    let (src, iter) = converted(&w);
    let f = iter.join("__0_1.distcp");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    to_hf(&w, &iter, &src)
        .assert_exit(2)
        .stderr_has("__0_1.distcp")
        .stderr_has("runs past the end");
    nothing_written(&w, "back");
}

#[test]
fn corrupted_tensor_bytes_fail_the_checksum() {
    let w = Workdir::new();
    let (src, iter) = converted(&w);
    // Flip one byte inside the elements of a chunk (not its archive headers).
    let m = ckpt_convert::formats::megatron::MegatronCheckpoint::open(&iter).unwrap();
    let t = m.tensor("decoder.layers.mlp.linear_fc2.weight").unwrap();
    let data = t.chunks[1].footprint();
    let f = m.files.get(data.file).path.clone();
    drop(m);
    let mut bytes = std::fs::read(&f).unwrap();
    bytes[(data.offset + data.len / 2) as usize] ^= 0x5a;
    std::fs::write(&f, bytes).unwrap();
    let name = f.file_name().unwrap().to_string_lossy().into_owned();
    let r = to_hf(&w, &iter, &src);
    assert_ne!(r.code(), 0);
    r.stderr_has(&name)
        .stderr_has("decoder.layers.mlp.linear_fc2.weight")
        .stderr_has("CRC-32");
    nothing_written(&w, "back");
}
