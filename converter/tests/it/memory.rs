//! The README's memory bound as a test: converting a checkpoint larger than the
//! bound keeps the converter's peak resident memory (the kernel's accounting of the
//! child, `wait4`'s `ru_maxrss`) within 2 × the largest tensor + 512 MiB, in both
//! directions, validation and smoke test included.

use std::process::{Command, Stdio};

use ckpt_convert::synthetic::ModelShape;

use crate::util::{Workdir, bin, to_hf_args, to_megatron_args};

const MIB: u64 = 1 << 20;

/// Runs `cmd` to success and returns its peak resident set in bytes.
fn peak_rss(w: &Workdir, cmd: &mut Command) -> u64 {
    let log = w.path("stderr.log");
    let child = cmd
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawn ckpt-convert");
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain data the kernel fills; `pid` is our live child, and
    // the handle is forgotten below so it never waits for it again.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid, "wait4: {}", std::io::Error::last_os_error());
    std::mem::forget(child);
    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{cmd:?} failed ({status}): {stderr}"
    );
    usage.ru_maxrss as u64 * 1024
}

#[test]
fn peak_memory_stays_within_twice_the_largest_tensor_plus_512_mib() {
    // About 700 MB of bf16 weights in tensors of at most 16 MiB (the embedding and
    // the output layer).
    let shape = ModelShape {
        layers: 36,
        hidden: 1024,
        intermediate: 2048,
        heads: 16,
        kv_heads: 4,
        head_dim: 64,
        vocab: 8192,
        ..ModelShape::tiny_llama()
    };
    let w = Workdir::new();
    let src = w.hf("src", &shape, 512 * MIB);
    let model: u64 = std::fs::read_dir(&src)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    let bf16 = 2;
    let largest = [
        shape.vocab * shape.hidden,
        2 * shape.intermediate * shape.hidden,
        (shape.heads + 2 * shape.kv_heads) * shape.head_dim * shape.hidden,
    ]
    .into_iter()
    .max()
    .unwrap()
        * bf16;
    let bound = 2 * largest + 512 * MIB;
    assert!(
        model > bound + 64 * MIB,
        "the model ({model} bytes) must be well above the bound ({bound} bytes)"
    );

    let rss = peak_rss(&w, bin().args(to_megatron_args(&w, &src, "run")));
    assert!(
        rss <= bound,
        "hf_to_megatron of {} MiB: peak RSS {} MiB > 2 × {} MiB + 512 MiB",
        model / MIB,
        rss / MIB,
        largest / MIB
    );
    let iter = w.path("run/iter_0000000");
    let rss = peak_rss(&w, bin().args(to_hf_args(&w, &iter, &src)));
    assert!(
        rss <= bound,
        "megatron_to_hf of {} MiB: peak RSS {} MiB > 2 × {} MiB + 512 MiB",
        model / MIB,
        rss / MIB,
        largest / MIB
    );
}
