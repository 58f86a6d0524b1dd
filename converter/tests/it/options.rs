//! `--threads` and `--memory-budget` change how a run works, not only what it
//! accepts (that any of them gives the same bytes is `properties.rs`).

use ckpt_convert::synthetic::ModelShape;

use crate::util::{Workdir, kv, run};

fn to_megatron(w: &Workdir, out: &str, extra: &[&str]) -> Vec<String> {
    let src = w.path("src");
    let mut args = vec![
        "run".to_owned(),
        "convert/hf_to_megatron".into(),
        kv("hf_model_id", &src),
        kv("megatron_path", &w.path(out)),
    ];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    args
}

/// `--threads N`: the conversion's workers, seen while a run is paused after
/// its first piece, are N threads named `ckpt-worker-0` to `ckpt-worker-{N-1}`.
#[cfg(feature = "failpoints")]
#[test]
fn threads_sets_how_many_workers_convert() {
    use crate::util::Paused;
    let w = Workdir::new();
    w.hf("src", &ModelShape::tiny_llama(), 1 << 30);
    for n in [1usize, 3] {
        let n_arg = n.to_string();
        let args = to_megatron(&w, &format!("run{n}"), &["--threads", &n_arg]);
        let p = Paused::start(&w, &args, "pieces:1");
        // A thread names itself once it first runs, which on a busy machine can
        // be after the run has paused: wait until every thread but the main one
        // has left the process's name behind.
        let names = || -> Vec<String> {
            let pid = p.pid();
            std::fs::read_dir(format!("/proc/{pid}/task"))
                .unwrap()
                .filter_map(|t| t.ok())
                .filter(|t| t.file_name().to_string_lossy() != pid.to_string())
                .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
                .map(|c| c.trim().to_owned())
                .collect()
        };
        let started = std::time::Instant::now();
        let names = loop {
            let now = names();
            if !now.iter().any(|c| c == "ckpt-convert") {
                break now;
            }
            assert!(
                started.elapsed() < ckpt_testcluster::test_deadline(),
                "threads never named: {now:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        p.resume().assert_exit(0);
        let workers: std::collections::BTreeSet<&str> = names
            .iter()
            .map(String::as_str)
            .filter(|c| c.starts_with("ckpt-worker-"))
            .collect();
        let want: Vec<String> = (0..n).map(|i| format!("ckpt-worker-{i}")).collect();
        assert_eq!(
            workers.into_iter().collect::<Vec<_>>(),
            want,
            "--threads {n}: threads {names:?}"
        );
    }
}

/// `--memory-budget`: the bytes of pieces in flight (inputs, output and
/// scratch, as the report's `peak_in_flight_bytes` counts them) never pass it;
/// a piece larger than the budget runs alone, charged the whole budget. By
/// default the budget is at least the largest piece, whose input and output
/// are each at least as large as the largest tensor (16 KiB here).
#[test]
fn memory_budget_bounds_the_bytes_in_flight() {
    let w = Workdir::new();
    w.hf("src", &ModelShape::tiny_llama(), 1 << 30);
    let peak = |out: &str, extra: &[&str]| -> u64 {
        let r = run(&to_megatron(
            &w,
            out,
            &[&["--json", "--threads", "4"], extra].concat(),
        ));
        r.assert_exit(0);
        let report: serde_json::Value = serde_json::from_str(&r.stdout()).unwrap();
        report["peak_in_flight_bytes"].as_u64().unwrap()
    };
    let default = peak("default", &[]);
    assert!(default >= 2 * (16 << 10), "default peak {default}");
    assert_eq!(peak("budget", &["--memory-budget", "10KB"]), 10_000);
}
