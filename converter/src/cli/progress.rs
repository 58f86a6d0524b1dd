//! Progress for the terminal (an indicatif bar on stderr) or for logs (a
//! `tracing` line every few seconds), behind the library's `Progress` trait.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ckpt_convert::execute::Progress;
use indicatif::{ProgressBar, ProgressStyle};

/// Picks a bar on a terminal, log lines otherwise.
pub fn for_stderr() -> Box<dyn Progress> {
    if std::io::stderr().is_terminal() {
        Box::new(Bar(Mutex::new(None)))
    } else {
        Box::new(Lines {
            phase: Mutex::new((String::new(), 0, Instant::now())),
            done: AtomicU64::new(0),
            last: Mutex::new(Instant::now()),
        })
    }
}

struct Bar(Mutex<Option<ProgressBar>>);

impl Progress for Bar {
    fn phase(&self, name: &str, total: u64) {
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>8} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(name.to_owned());
        if let Some(old) = self.0.lock().expect("bar lock").replace(bar) {
            old.finish_and_clear();
        }
    }
    fn advance(&self, bytes: u64) {
        if let Some(bar) = &*self.0.lock().expect("bar lock") {
            bar.inc(bytes);
        }
    }
    fn finish(&self) {
        if let Some(bar) = self.0.lock().expect("bar lock").take() {
            bar.finish_and_clear();
        }
    }
}

struct Lines {
    phase: Mutex<(String, u64, Instant)>,
    done: AtomicU64,
    last: Mutex<Instant>,
}

impl Progress for Lines {
    fn phase(&self, name: &str, total: u64) {
        *self.phase.lock().expect("phase lock") = (name.to_owned(), total, Instant::now());
        self.done.store(0, Ordering::Relaxed);
        tracing::info!(phase = name, total_bytes = total, "phase started");
    }
    fn advance(&self, bytes: u64) {
        let done = self.done.fetch_add(bytes, Ordering::Relaxed) + bytes;
        let mut last = self.last.lock().expect("progress lock");
        if last.elapsed() >= Duration::from_secs(5) {
            *last = Instant::now();
            let (name, total, start) = &*self.phase.lock().expect("phase lock");
            let secs = start.elapsed().as_secs_f64().max(1e-9);
            tracing::info!(
                phase = %name,
                done_bytes = done,
                total_bytes = *total,
                percent = format!("{:.1}", 100.0 * done as f64 / (*total).max(1) as f64),
                mb_per_s = format!("{:.0}", done as f64 / secs / 1e6),
                "progress"
            );
        }
    }
    fn finish(&self) {}
}
