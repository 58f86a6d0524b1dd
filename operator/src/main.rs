//! `ckpt-operator`: watches `CheckpointConversion` resources and runs conversion
//! Jobs. With `--leader-elect`, replicas share a Lease and only the holder
//! reconciles, so two replicas are safe.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::Context as _;
use ckpt_operator::controller::{self, RunSettings};
use ckpt_operator::http::{self, Health};
use ckpt_operator::job::JobDefaults;
use ckpt_operator::metrics::Metrics;
use clap::Parser;
use kube::Client;
use tokio::sync::watch;
use tracing_subscriber::EnvFilter;

/// Reconciles CheckpointConversion resources into conversion Jobs.
#[derive(Debug, Parser)]
#[command(name = "ckpt-operator", version)]
struct Args {
    /// The converter image Jobs run.
    #[arg(long, env = "CKPT_CONVERTER_IMAGE")]
    converter_image: String,
    /// Pull policy of the converter image.
    #[arg(long, env = "CKPT_CONVERTER_IMAGE_PULL_POLICY")]
    converter_image_pull_policy: Option<String>,
    /// The converter binary inside the image.
    #[arg(long, env = "CKPT_CONVERTER_COMMAND", default_value = "/ckpt-convert")]
    converter_command: String,
    /// Watch (and run Jobs in) only these namespaces: repeat the flag, or separate
    /// them with commas. Without it, all namespaces.
    #[arg(long = "namespace", env = "WATCH_NAMESPACE", value_delimiter = ',')]
    namespaces: Vec<String>,
    /// Default pod retries of a conversion Job.
    #[arg(long, default_value_t = 2)]
    job_backoff_limit: i32,
    /// Default seconds a finished Job is kept (default: until the resource is deleted).
    #[arg(long)]
    job_ttl_seconds: Option<i32>,
    /// Default service account of converter pods.
    #[arg(long)]
    job_service_account: Option<String>,
    /// Default user id of converter pods.
    #[arg(long, default_value_t = 65532)]
    job_run_as_user: i64,
    /// At most this many conversion Jobs created per second, across all watched
    /// namespaces (0: no limit). Resources beyond it wait, `Pending` with reason
    /// `JobQueued`, for their turn.
    #[arg(long, default_value_t = 2.0)]
    jobs_per_second: f64,
    /// Reconciles that may run at once, across all watched namespaces.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..))]
    reconcile_concurrency: u16,
    /// Address of /metrics, /healthz, /readyz.
    #[arg(long, default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Elect a leader through a Lease (for more than one replica).
    #[arg(long)]
    leader_elect: bool,
    /// The Lease name.
    #[arg(long, default_value = "ckpt-operator")]
    lease_name: String,
    /// The Lease namespace (default: the pod's namespace).
    #[arg(long, env = "POD_NAMESPACE")]
    lease_namespace: Option<String>,
    /// Seconds a leader holds the Lease without renewing it. A leader that cannot
    /// renew in time (a stalled node, an overloaded apiserver) stops reconciling. A
    /// standby looks again when the Lease would expire, so this is also how long
    /// failover takes, even after a leader released the Lease on shutdown.
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(2..))]
    lease_duration_seconds: u64,
    /// Seconds before the Lease expires at which the leader renews it (less than
    /// the duration): the time a renewal may take.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    lease_renew_grace_seconds: u64,
    /// This replica's identity (default: the pod name).
    #[arg(long, env = "POD_NAME")]
    instance: Option<String>,
    /// Log as JSON lines.
    #[arg(long, env = "LOG_JSON")]
    log_json: bool,
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
    tracing::info!("shutting down");
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.lease_renew_grace_seconds >= args.lease_duration_seconds {
        anyhow::bail!(
            "--lease-renew-grace-seconds ({}) must be less than --lease-duration-seconds ({})",
            args.lease_renew_grace_seconds,
            args.lease_duration_seconds
        );
    }
    if !(args.jobs_per_second.is_finite() && args.jobs_per_second >= 0.0) {
        anyhow::bail!(
            "--jobs-per-second={}: expected a number ≥ 0 (0: no limit)",
            args.jobs_per_second
        );
    }
    let filter = EnvFilter::try_from_env("LOG_LEVEL").unwrap_or_else(|_| EnvFilter::new("info"));
    let subscriber = tracing_subscriber::fmt().with_env_filter(filter);
    if args.log_json {
        subscriber.json().init();
    } else {
        subscriber.init();
    }
    let client = Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let metrics = Arc::new(Metrics::default());
    let health = Arc::new(Health::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .with_context(|| format!("binding {}", args.metrics_addr))?;
    // With port 0 the kernel picks one; say which.
    tracing::info!(addr = %listener.local_addr()?, "serving /metrics, /healthz, /readyz");
    let server = tokio::spawn(http::serve(
        listener,
        metrics.clone(),
        health.clone(),
        stopped(stop_rx.clone()),
    ));

    let settings = RunSettings {
        namespaces: args.namespaces.clone(),
        defaults: JobDefaults {
            image: args.converter_image.clone(),
            image_pull_policy: args.converter_image_pull_policy.clone(),
            backoff_limit: args.job_backoff_limit,
            ttl_seconds_after_finished: args.job_ttl_seconds,
            run_as_user: args.job_run_as_user,
            service_account: args.job_service_account.clone(),
            command: args.converter_command.clone(),
            created_by: args.instance.clone(),
        },
        instance: args.instance.clone(),
        concurrency: args.reconcile_concurrency,
        jobs_per_second: (args.jobs_per_second > 0.0).then_some(args.jobs_per_second),
    };

    if args.leader_elect {
        let identity = args
            .instance
            .clone()
            .unwrap_or_else(|| format!("ckpt-operator-{}", std::process::id()));
        let mut builder =
            kube_lease_manager::LeaseManagerBuilder::new(client.clone(), &args.lease_name)
                .with_identity(&identity)
                .with_duration(args.lease_duration_seconds)
                .with_grace(args.lease_renew_grace_seconds);
        if let Some(ns) = &args.lease_namespace {
            builder = builder.with_namespace(ns);
        }
        let manager = builder
            .build()
            .await
            .context("preparing the leader Lease")?;
        let (mut leader, lease_task) = manager.watch().await;
        health.ready.store(true, Ordering::Relaxed);
        tracing::info!(%identity, lease = %args.lease_name, "waiting to become leader");
        let mut stop = stop_rx.clone();
        loop {
            if *leader.borrow_and_update() {
                break;
            }
            tokio::select! {
                r = leader.changed() => r.context("the leader election task ended")?,
                _ = stop.wait_for(|s| *s) => {
                    drop(leader);
                    let _ = lease_task.await;
                    let _ = server.await;
                    return Ok(());
                }
            }
        }
        tracing::info!(%identity, "leading");
        health.leader.store(true, Ordering::Relaxed);
        // Stop reconciling when asked to, or at once if the lease is lost.
        let mut lost = leader.clone();
        let stop_or_lost = {
            let mut stop = stop_rx.clone();
            async move {
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => {},
                    _ = lost.wait_for(|l| !*l) => tracing::warn!("lost the leader lease; stopping"),
                }
            }
        };
        controller::run(client, settings, metrics, stop_or_lost).await?;
        health.leader.store(false, Ordering::Relaxed);
        drop(leader);
        let _ = lease_task.await;
    } else {
        health.ready.store(true, Ordering::Relaxed);
        health.leader.store(true, Ordering::Relaxed);
        controller::run(client, settings, metrics, stopped(stop_rx.clone())).await?;
    }
    let _ = server.await;
    Ok(())
}
