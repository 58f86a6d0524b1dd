//! Prometheus metrics: reconciles, errors, conversions by step and outcome, and
//! durations.

use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of a reconcile error.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// The error kind.
    pub error: String,
}

/// Labels of a finished conversion.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConversionLabels {
    /// The converter step.
    pub step: String,
    /// `succeeded` or `failed`.
    pub outcome: String,
}

/// Labels of a conversion duration.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabels {
    /// The converter step.
    pub step: String,
}

/// The operator's metrics.
pub struct Metrics {
    registry: Mutex<Registry>,
    /// Reconciles run.
    pub reconciles: Counter,
    /// Reconcile errors by kind.
    pub errors: Family<ErrorLabels, Counter>,
    /// Conversions finished, by step and outcome.
    pub conversions: Family<ConversionLabels, Counter>,
    /// Reconcile durations.
    pub reconcile_seconds: Histogram,
    /// Conversion durations (Job start to finish), by step.
    pub conversion_seconds: Family<StepLabels, Histogram>,
    /// Reconciles running now (at most `--reconcile-concurrency`).
    pub reconciles_running: Gauge,
    /// The most reconciles that ran at once.
    pub reconciles_running_peak: Gauge,
    /// Jobs created.
    pub jobs_created: Counter,
    /// Resources waiting for a Job creation slot (`--jobs-per-second`).
    pub jobs_waiting: Gauge,
    /// Tensor bytes each pod of a split run's parts wrote.
    pub part_bytes: Histogram,
    /// How long each pod of a split run's parts ran.
    pub part_seconds: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("ckpt_operator");
        let reconciles = Counter::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let conversions = Family::<ConversionLabels, Counter>::default();
        let reconcile_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        let conversion_seconds = Family::<StepLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(1.0, 2.0, 16))
        });
        registry.register("reconciles", "Reconciles run", reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Reconcile errors by kind",
            errors.clone(),
        );
        registry.register(
            "conversions",
            "Conversions finished, by step and outcome",
            conversions.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time spent in one reconcile",
            reconcile_seconds.clone(),
        );
        registry.register(
            "conversion_duration_seconds",
            "Job start to finish, by step",
            conversion_seconds.clone(),
        );
        let reconciles_running = Gauge::default();
        let reconciles_running_peak = Gauge::default();
        let jobs_created = Counter::default();
        let jobs_waiting = Gauge::default();
        registry.register(
            "reconciles_running",
            "Reconciles running now",
            reconciles_running.clone(),
        );
        registry.register(
            "reconciles_running_peak",
            "The most reconciles that ran at once",
            reconciles_running_peak.clone(),
        );
        registry.register("jobs_created", "Jobs created", jobs_created.clone());
        registry.register(
            "jobs_waiting",
            "Resources waiting for a Job creation slot",
            jobs_waiting.clone(),
        );
        // 1 MiB to 4 TiB, and 1 s to about 9 hours.
        let part_bytes = Histogram::new(exponential_buckets(1_048_576.0, 4.0, 12));
        let part_seconds = Histogram::new(exponential_buckets(1.0, 2.0, 16));
        registry.register(
            "part_bytes",
            "Tensor bytes written by each pod of a split conversion's parts",
            part_bytes.clone(),
        );
        registry.register(
            "part_duration_seconds",
            "How long each pod of a split conversion's parts ran",
            part_seconds.clone(),
        );
        Metrics {
            registry: Mutex::new(registry),
            part_bytes,
            part_seconds,
            reconciles,
            errors,
            conversions,
            reconcile_seconds,
            conversion_seconds,
            reconciles_running,
            reconciles_running_peak,
            jobs_created,
            jobs_waiting,
        }
    }
}

impl Metrics {
    /// Counts a reconcile as running until the guard is dropped.
    pub fn running(&self) -> Running<'_> {
        let now = self.reconciles_running.inc() + 1;
        self.reconciles_running_peak
            .inner()
            .fetch_max(now, std::sync::atomic::Ordering::Relaxed);
        Running(self)
    }

    /// Counts a finished conversion.
    pub fn finished(&self, step: &str, outcome: &str, duration: Option<Duration>) {
        self.conversions
            .get_or_create(&ConversionLabels {
                step: step.into(),
                outcome: outcome.into(),
            })
            .inc();
        if let Some(d) = duration {
            self.conversion_seconds
                .get_or_create(&StepLabels { step: step.into() })
                .observe(d.as_secs_f64());
        }
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(
            &mut out,
            &self.registry.lock().expect("registry lock"),
        )
        .expect("writing to a String cannot fail");
        out
    }
}

/// A running reconcile ([`Metrics::running`]).
pub struct Running<'a>(&'a Metrics);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.reconciles_running.dec();
    }
}
