//! Whole-run properties over random small models of every family the synthetic
//! writer makes (Llama, Mistral, Qwen2 with QKV biases, Qwen3 with QK norms; tied
//! or not; vocabularies that need padding; bf16, f16 or f32), run in process:
//! - every plan reads each source element exactly once (a tied head reads the
//!   embedding a second time, by design) and its pieces and fixed bytes tile
//!   every output file exactly;
//! - HF → Megatron → HF gives back every tensor bit for bit;
//! - any `--threads` and `--memory-budget` give the same bytes.
//!
//! Few cases, each a few conversions of a model of some kilobytes: seconds in all.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::Path;

use ckpt_convert::execute::{Options, Silent};
use ckpt_convert::formats::dtype::DType;
use ckpt_convert::formats::hf::HfCheckpoint;
use ckpt_convert::formats::manifest::Manifest;
use ckpt_convert::formats::{torch_save, torch_zip};
use ckpt_convert::pipeline::RunOptions;
use ckpt_convert::plan::{Dest, Plan, TensorStore};
use ckpt_convert::steps::{self, Params};
use ckpt_convert::synthetic::{self, ModelShape};
use ckpt_wire::Step;
use proptest::prelude::*;

thread_local! {
    /// What `check_plan` found, per plan of the current run.
    static FOUND: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
    /// Plans checked in the current run.
    static CHECKED: RefCell<usize> = const { RefCell::new(0) };
}

/// Checks one plan's reads and layout; problems go to `FOUND` (a panic here
/// would unwind through the library).
fn check_plan(plan: &Plan, stores: &[&dyn TensorStore]) {
    let mut problems = Vec::new();
    // Reads: a count per source element.
    let mut counts: BTreeMap<(usize, usize), Vec<u32>> = BTreeMap::new();
    for p in &plan.pieces {
        for i in &p.inputs {
            let t = &stores[i.store].tensors()[i.tensor];
            let c = counts
                .entry((i.store, i.tensor))
                .or_insert_with(|| vec![0; t.numel() as usize]);
            let strides = torch_save::contiguous_strides(&t.shape);
            let n = i.sizes.iter().product::<u64>();
            for k in 0..n {
                // The k-th element of the box, row-major, as a flat index.
                let (mut rest, mut flat) = (k, 0u64);
                for a in (0..i.sizes.len()).rev() {
                    flat += (i.offsets[a] + rest % i.sizes[a]) * strides[a];
                    rest /= i.sizes[a];
                }
                c[flat as usize] += 1;
            }
        }
    }
    for (s, store) in stores.iter().enumerate() {
        for (ti, t) in store.tensors().iter().enumerate() {
            let skipped = plan.skipped.iter().any(|(n, _)| n == &t.name);
            let tied_embedding = t.name.contains("embed")
                && plan
                    .pieces
                    .iter()
                    .any(|p| p.transform.contains("tied copy"));
            match counts.get(&(s, ti)) {
                None if skipped => {}
                None => problems.push(format!("{} is never read", t.name)),
                Some(c) => {
                    let want = if tied_embedding { 2 } else { 1 };
                    if let Some(k) = c.iter().position(|&n| n != want) {
                        problems.push(format!(
                            "{}: element {k} read {} times, expected {want}",
                            t.name, c[k]
                        ));
                    }
                }
            }
        }
    }
    // Layout: fixed bytes and pieces tile each file, from 0 to its length.
    for (fi, f) in plan.files.iter().enumerate() {
        let mut spans: Vec<(u64, u64, String)> = f
            .fixed
            .iter()
            .map(|(o, b)| (*o, b.len() as u64, "fixed bytes".to_owned()))
            .collect();
        for p in &plan.pieces {
            match &p.dest {
                Dest::Raw { file, offset } if *file == fi => {
                    spans.push((*offset, p.nbytes(), p.name.clone()));
                }
                Dest::DcpItem { file, offset } if *file == fi => {
                    let len = torch_zip::layout_archive(
                        &torch_save::tensor_archive_records(p.dtype, &p.shape, p.nbytes()),
                        0,
                    )
                    .len();
                    spans.push((*offset, len, p.name.clone()));
                }
                _ => {}
            }
        }
        spans.sort();
        let mut at = 0u64;
        for (o, n, what) in &spans {
            if *o != at {
                problems.push(format!(
                    "{}: {what} at {o}, expected {at} (a gap or an overlap)",
                    f.rel
                ));
            }
            at = o + n;
        }
        if at != f.len {
            problems.push(format!("{}: filled to {at} of {} bytes", f.rel, f.len));
        }
    }
    FOUND.with(|f| f.borrow_mut().extend(problems));
    CHECKED.with(|c| *c.borrow_mut() += 1);
}

/// Runs `step` in process with `params`, checking its plan.
fn convert(step: Step, params: &[(&str, String)], exec: Options) {
    let map: BTreeMap<String, String> = params
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect();
    let mut p = Params::new(step, map);
    let opts = RunOptions {
        exec,
        plan_check: Some(check_plan),
        ..RunOptions::default()
    };
    steps::run(step, &mut p, opts, &Silent).unwrap_or_else(|e| panic!("{step}: {e}"));
    let problems = FOUND.with(|f| std::mem::take(&mut *f.borrow_mut()));
    assert!(problems.is_empty(), "{step}: {problems:#?}");
    let checked = CHECKED.with(|c| std::mem::take(&mut *c.borrow_mut()));
    assert_eq!(checked, 1, "{step}: plans checked");
}

fn shape_strategy() -> impl Strategy<Value = ModelShape> {
    (
        0usize..4,
        1u64..3,
        prop_oneof![Just((1u64, 1u64)), Just((2, 1)), Just((2, 2)), Just((4, 2))],
        prop_oneof![Just(8u64), Just(16)],
        1u64..5,
        1u64..9,
        5u64..40,
        any::<bool>(),
        prop_oneof![Just(DType::BF16), Just(DType::F16), Just(DType::F32)],
    )
        .prop_map(
            |(family, layers, (heads, kv_heads), head_dim, h8, f8, vocab, tied, dtype)| {
                let mut s = ModelShape::tiny_llama();
                let (arch, model_type) = [
                    ("LlamaForCausalLM", "llama"),
                    ("MistralForCausalLM", "mistral"),
                    ("Qwen2ForCausalLM", "qwen2"),
                    ("Qwen3ForCausalLM", "qwen3"),
                ][family];
                s.architecture = arch.into();
                s.model_type = model_type.into();
                s.qkv_bias = model_type == "qwen2";
                s.qk_norm = model_type == "qwen3";
                s.layers = layers;
                s.heads = heads;
                s.kv_heads = kv_heads;
                s.head_dim = head_dim;
                s.hidden = 8 * h8;
                s.intermediate = 8 * f8;
                // At least the tokenizer's three special tokens.
                s.vocab = vocab;
                s.tied = tied;
                s.dtype = dtype;
                s
            },
        )
}

fn manifest_files(dir: &Path) -> (Vec<(String, u64, String)>, String) {
    let m = Manifest::read(&dir.join("ckpt-manifest.json")).unwrap();
    (
        m.files
            .into_iter()
            .map(|f| (f.path, f.size, f.xxh3))
            .collect(),
        m.output.weights_digest,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn conversions_read_once_tile_their_files_round_trip_and_ignore_threads(
        shape in shape_strategy(),
        max_shard in 2_000u64..40_000,
        threads in 2usize..5,
        budget in prop_oneof![Just(None), Just(Some(1u64)), (1u64..200_000).prop_map(Some)],
        iteration in 0u64..3,
    ) {
        let w = tempfile::tempdir().unwrap();
        let src = w.path().join("src");
        synthetic::write_hf(&src, &shape, 5, max_shard).unwrap();
        let dtype = shape.dtype.torch_name().to_owned();
        let quiet = |v: Vec<(&'static str, String)>| {
            let mut v = v;
            v.push(("validate", "false".into()));
            v.push(("dtype", dtype.clone()));
            v
        };
        let one = Options { threads: 1, memory_budget: None };
        let many = Options { threads, memory_budget: budget };
        let meg = |name: &str| w.path().join(name).join(format!("iter_{iteration:07}"));
        for (out, exec) in [("a", one.clone()), ("b", many.clone())] {
            convert(
                Step::HfToMegatron,
                &quiet(vec![
                    ("hf_model_id", src.display().to_string()),
                    ("megatron_path", meg(out).display().to_string()),
                ]),
                exec,
            );
        }
        prop_assert_eq!(manifest_files(&meg("a")), manifest_files(&meg("b")));
        for (out, exec) in [("back-a", one), ("back-b", many)] {
            convert(
                Step::MegatronToHf,
                &quiet(vec![
                    ("megatron_path", meg("a").display().to_string()),
                    ("hf_model_id", src.display().to_string()),
                    ("hf_path", w.path().join(out).display().to_string()),
                ]),
                exec,
            );
        }
        prop_assert_eq!(
            manifest_files(&w.path().join("back-a")),
            manifest_files(&w.path().join("back-b"))
        );
        let a = HfCheckpoint::open(&src).unwrap();
        let b = HfCheckpoint::open(&w.path().join("back-a")).unwrap();
        prop_assert_eq!(a.tensors.len(), b.tensors.len());
        for t in &a.tensors {
            let u = b.tensor(&t.name).unwrap();
            prop_assert_eq!((u.dtype, &u.shape), (t.dtype, &t.shape));
            prop_assert!(
                a.files.slice(t.chunks[0].footprint()) == b.files.slice(u.chunks[0].footprint()),
                "{} differs after the round trip",
                &t.name
            );
        }
    }
}
