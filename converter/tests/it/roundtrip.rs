//! HF → Megatron → HF is bit-identical for every dense family, and never touches
//! the source.

use ckpt_convert::formats::dtype::DType;
use ckpt_convert::formats::hf::HfCheckpoint;
use ckpt_convert::formats::megatron::MegatronCheckpoint;
use ckpt_convert::synthetic::ModelShape;

use crate::util::{Workdir, kv, run};

fn llama() -> ModelShape {
    let mut s = ModelShape::tiny_llama();
    s.layers = 3;
    s
}

fn variants() -> Vec<(&'static str, ModelShape, Vec<String>)> {
    let mut tied = llama();
    tied.tied = true;
    let mut mistral = llama();
    mistral.architecture = "MistralForCausalLM".into();
    mistral.model_type = "mistral".into();
    let mut qwen2 = llama();
    qwen2.architecture = "Qwen2ForCausalLM".into();
    qwen2.model_type = "qwen2".into();
    qwen2.qkv_bias = true;
    let mut qwen3 = llama();
    qwen3.architecture = "Qwen3ForCausalLM".into();
    qwen3.model_type = "qwen3".into();
    qwen3.qk_norm = true;
    qwen3.head_dim = 32; // head_dim != hidden / heads, as in real Qwen3
    let mut padded = llama();
    padded.vocab = 130;
    let mut f32_src = llama();
    f32_src.dtype = DType::F32;
    vec![
        ("llama", llama(), vec![]),
        ("llama_tied", tied, vec![]),
        ("mistral", mistral, vec![]),
        ("qwen2", qwen2, vec![]),
        ("qwen3", qwen3, vec![]),
        (
            "padded_vocab",
            padded,
            vec!["make_vocab_size_divisible_by=128".into()],
        ),
        ("float32", f32_src, vec!["dtype=float32".into()]),
        (
            "tp2_layout",
            llama(),
            vec!["tp=2".into(), "make_vocab_size_divisible_by=64".into()],
        ),
    ]
}

#[test]
fn every_family_round_trips_bit_identically() {
    for (name, shape, extra) in variants() {
        let w = Workdir::new();
        let src = w.hf("src", &shape, 60_000);
        let before = w.snapshot("src");
        let mut args = vec![
            "run".to_owned(),
            "convert/hf_to_megatron".into(),
            kv("hf_model_id", &src),
            kv("megatron_path", &w.path("meg")),
        ];
        args.extend(extra.iter().cloned());
        run(&args).assert_exit(0);
        let iter = w.path("meg/iter_0000000");
        let dtype_arg: Vec<String> = extra
            .iter()
            .filter(|a| a.starts_with("dtype="))
            .cloned()
            .collect();
        let mut back = vec![
            "run".to_owned(),
            "convert/megatron_to_hf".into(),
            kv("megatron_path", &iter),
            kv("hf_model_id", &src),
            kv("hf_path", &w.path("back")),
        ];
        back.extend(dtype_arg);
        run(&back).assert_exit(0);
        assert_eq!(before, w.snapshot("src"), "{name}: the source changed");

        let a = HfCheckpoint::open(&src).unwrap();
        let b = HfCheckpoint::open(&w.path("back")).unwrap();
        assert_eq!(a.tensors.len(), b.tensors.len(), "{name}");
        for t in &a.tensors {
            let u = b
                .tensor(&t.name)
                .unwrap_or_else(|| panic!("{name}: {} missing", t.name));
            assert_eq!(
                (u.dtype, &u.shape),
                (t.dtype, &t.shape),
                "{name}: {}",
                t.name
            );
            assert_eq!(
                a.files.slice(t.chunks[0].footprint()),
                b.files.slice(u.chunks[0].footprint()),
                "{name}: {} differs",
                t.name
            );
        }
        // The output mirrors the source's shard files.
        assert_eq!(a.shards, b.shards, "{name}");
        for (t, shard) in &a.shard_of {
            assert_eq!(&b.shard_of[t], shard, "{name}: {t}");
        }
        for dir in [iter.clone(), w.path("back")] {
            let v = ckpt_convert::formats::manifest::verify(&dir).unwrap();
            assert!(v.problems.is_empty(), "{name}: {:?}", v.problems);
        }
    }
}

#[test]
fn megatron_layout_is_what_megatron_core_saves() {
    let w = Workdir::new();
    let mut shape = llama();
    shape.vocab = 130;
    let src = w.hf("src", &shape, 1 << 30);
    run(&[
        "run".to_owned(),
        "convert/hf_to_megatron".into(),
        kv("hf_model_id", &src),
        kv("megatron_path", &w.path("meg")),
        "make_vocab_size_divisible_by=128".into(),
    ])
    .assert_exit(0);
    let m = MegatronCheckpoint::open(&w.path("meg/iter_0000000")).unwrap();
    let shapes: Vec<(String, Vec<u64>, usize)> = m
        .tensors
        .iter()
        .map(|t| (t.name.clone(), t.shape.clone(), t.chunks.len()))
        .collect();
    let l = "decoder.layers.";
    let expected = vec![
        ("decoder.final_layernorm.weight".to_owned(), vec![64], 1),
        (
            format!("{l}mlp.linear_fc1.layer_norm_weight"),
            vec![3, 64],
            3,
        ),
        (format!("{l}mlp.linear_fc1.weight"), vec![3, 256, 64], 6),
        (format!("{l}mlp.linear_fc2.weight"), vec![3, 64, 128], 3),
        (
            format!("{l}self_attention.linear_proj.weight"),
            vec![3, 64, 64],
            3,
        ),
        (
            format!("{l}self_attention.linear_qkv.layer_norm_weight"),
            vec![3, 64],
            3,
        ),
        (
            format!("{l}self_attention.linear_qkv.weight"),
            vec![3, 128, 64],
            3,
        ),
        (
            "embedding.word_embeddings.weight".to_owned(),
            vec![256, 64],
            1,
        ),
        ("output_layer.weight".to_owned(), vec![256, 64], 1),
    ];
    assert_eq!(shapes, expected);
    // One _extra_state item per TE module per layer, keyed shard_{layer}_{layers}.
    assert_eq!(m.byte_items.len(), 15);
    assert!(m.byte_items.iter().any(|b| b.fqn == "decoder.layers.self_attention.core_attention._extra_state/shard_2_3"));
    // The padded rows are zeros; the fc1 chunks are the gate rows then the up rows.
    let emb = m.tensor("embedding.word_embeddings.weight").unwrap();
    let bytes = ckpt_convert::formats::source::read_box(&m.files, emb, &[130, 0], &[126, 64]);
    assert!(bytes.iter().all(|&b| b == 0));
    let fc1 = m.tensor("decoder.layers.mlp.linear_fc1.weight").unwrap();
    let offsets: Vec<Vec<u64>> = fc1.chunks.iter().map(|c| c.offsets.clone()).collect();
    assert!(offsets.contains(&vec![1, 0, 0]) && offsets.contains(&vec![1, 128, 0]));
    let hf = HfCheckpoint::open(&src).unwrap();
    let up = hf.tensor("model.layers.1.mlp.up_proj.weight").unwrap();
    assert_eq!(
        ckpt_convert::formats::source::read_box(&m.files, fc1, &[1, 128, 0], &[1, 128, 64])
            .as_ref(),
        hf.files.slice(up.chunks[0].footprint())
    );
    let tracker = std::fs::read_to_string(w.path("meg/latest_checkpointed_iteration.txt")).unwrap();
    assert_eq!(tracker, "0");
}

#[test]
fn qkv_is_interleaved_per_query_group() {
    // heads 4, groups 2, head_dim 16: rows of group g are q(2 heads), k, v.
    let w = Workdir::new();
    let src = w.hf("src", &llama(), 1 << 30);
    run(&[
        "run".to_owned(),
        "convert/hf_to_megatron".into(),
        kv("hf_model_id", &src),
        kv("megatron_path", &w.path("meg")),
    ])
    .assert_exit(0);
    let m = MegatronCheckpoint::open(&w.path("meg/iter_0000000")).unwrap();
    let hf = HfCheckpoint::open(&src).unwrap();
    let qkv = m
        .tensor("decoder.layers.self_attention.linear_qkv.weight")
        .unwrap();
    let row = 64 * 2; // bf16 row bytes
    let layer = ckpt_convert::formats::source::read_box(&m.files, qkv, &[2, 0, 0], &[1, 128, 64]);
    let get = |n: &str| {
        hf.files
            .slice(
                hf.tensor(&format!("model.layers.2.self_attn.{n}.weight"))
                    .unwrap()
                    .chunks[0]
                    .footprint(),
            )
            .to_vec()
    };
    let (q, k, v) = (get("q_proj"), get("k_proj"), get("v_proj"));
    for g in 0..2usize {
        let base = g * 64 * row; // (2 q heads + k + v) * 16 rows per group
        assert_eq!(
            &layer[base..base + 32 * row],
            &q[g * 32 * row..(g + 1) * 32 * row],
            "q of group {g}"
        );
        assert_eq!(
            &layer[base + 32 * row..base + 48 * row],
            &k[g * 16 * row..(g + 1) * 16 * row],
            "k of group {g}"
        );
        assert_eq!(
            &layer[base + 48 * row..base + 64 * row],
            &v[g * 16 * row..(g + 1) * 16 * row],
            "v of group {g}"
        );
    }
}
