//! Pod status bodies as the kubelet writes them, and its termination-message
//! rules (`pkg/kubelet/kuberuntime/kuberuntime_container.go`,
//! `pkg/kubelet/container/runtime.go`, `pkg/kubelet/status/generate.go` at v1.37.2).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde_json::{Value, json};

/// The most bytes of a termination-message file that reach the status (its tail).
pub const MAX_TERMINATION_MESSAGE: usize = 4096;
/// `FallbackToLogsOnError`: at most this many bytes …
pub const MAX_LOG_FALLBACK_BYTES: usize = 2048;
/// … of at most this many last lines of the container's log.
pub const MAX_LOG_FALLBACK_LINES: usize = 80;

pub(crate) fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

fn t(time: &Time) -> Value {
    serde_json::to_value(time).expect("a timestamp serializes")
}

/// The last `max` bytes of `bytes`, starting at a UTF-8 character boundary,
/// invalid sequences replaced.
pub(crate) fn tail_str(bytes: &[u8], max: usize) -> String {
    let mut start = bytes.len().saturating_sub(max);
    while start < bytes.len() && (bytes[start] & 0b1100_0000) == 0b1000_0000 {
        start += 1;
    }
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

/// The kubelet's fallback message: the last 80 lines of the log, of which the
/// last 2048 bytes.
pub(crate) fn log_fallback(log: &[u8]) -> String {
    let mut start = log.len();
    let mut lines = 0;
    // Walk back over at most 80 line ends (a final newline does not open a line).
    let body = log.strip_suffix(b"\n").unwrap_or(log);
    for (i, b) in body.iter().enumerate().rev() {
        if *b == b'\n' {
            lines += 1;
            if lines == MAX_LOG_FALLBACK_LINES {
                start = i + 1;
                break;
            }
        }
    }
    if lines < MAX_LOG_FALLBACK_LINES {
        start = 0;
    }
    tail_str(&log[start..], MAX_LOG_FALLBACK_BYTES)
}

/// The message the kubelet puts into `state.terminated.message`.
pub(crate) fn termination_message(
    file: Option<&[u8]>,
    log: &[u8],
    exit_code: i32,
    fallback_to_logs: bool,
) -> String {
    let from_file = file
        .map(|f| tail_str(f, MAX_TERMINATION_MESSAGE))
        .unwrap_or_default();
    if from_file.is_empty() && fallback_to_logs && exit_code != 0 {
        log_fallback(log)
    } else {
        from_file
    }
}

fn condition(kind: &str, status: bool, reason: Option<&str>, at: &Time) -> Value {
    let mut c = json!({
        "type": kind,
        "status": if status { "True" } else { "False" },
        "lastTransitionTime": t(at),
    });
    if let Some(r) = reason {
        c["reason"] = r.into();
    }
    c
}

/// Phase Running, the container running since `started`.
pub(crate) fn running(container: &str, image: &str, pid: u32, started: &Time) -> Value {
    json!({"status": {
        "phase": "Running",
        "startTime": t(started),
        "conditions": [
            condition("PodReadyToStartContainers", true, None, started),
            condition("Initialized", true, None, started),
            condition("Ready", true, None, started),
            condition("ContainersReady", true, None, started),
            condition("PodScheduled", true, None, started),
        ],
        "containerStatuses": [{
            "name": container, "image": image, "imageID": "",
            "containerID": format!("standin://{pid}"),
            "ready": true, "started": true, "restartCount": 0,
            "state": {"running": {"startedAt": t(started)}},
        }],
    }})
}

/// How a container ended.
pub(crate) struct Terminated<'a> {
    pub(crate) container: &'a str,
    pub(crate) image: &'a str,
    pub(crate) container_id: Option<String>,
    pub(crate) exit_code: i32,
    /// `Completed`, `Error`, `StartError`, `StandInCannotEmulate`, …
    pub(crate) reason: &'a str,
    pub(crate) message: &'a str,
    pub(crate) started: &'a Time,
    pub(crate) finished: &'a Time,
    /// Pod-level `status.reason`/`message` (e.g. `DeadlineExceeded`).
    pub(crate) pod_reason: Option<(&'a str, &'a str)>,
}

/// Phase Succeeded (exit 0) or Failed, with the terminated container state
/// and the conditions of a finished pod.
pub(crate) fn terminated(x: &Terminated<'_>) -> Value {
    let succeeded = x.exit_code == 0 && x.pod_reason.is_none();
    let (phase, why) = if succeeded {
        ("Succeeded", "PodCompleted")
    } else {
        ("Failed", "PodFailed")
    };
    let mut state = json!({
        "exitCode": x.exit_code,
        "reason": x.reason,
        "startedAt": t(x.started),
        "finishedAt": t(x.finished),
    });
    if !x.message.is_empty() {
        state["message"] = x.message.into();
    }
    if let Some(id) = &x.container_id {
        state["containerID"] = id.clone().into();
    }
    let mut status = json!({
        "phase": phase,
        "startTime": t(x.started),
        "conditions": [
            condition("PodReadyToStartContainers", false, None, x.finished),
            condition("Initialized", true, Some("PodCompleted"), x.started),
            condition("Ready", false, Some(why), x.finished),
            condition("ContainersReady", false, Some(why), x.finished),
            condition("PodScheduled", true, None, x.started),
        ],
        "containerStatuses": [{
            "name": x.container, "image": x.image, "imageID": "",
            "ready": false, "started": false, "restartCount": 0,
            "state": {"terminated": state},
        }],
    });
    if let Some(id) = &x.container_id {
        status["containerStatuses"][0]["containerID"] = id.clone().into();
    }
    if let Some((reason, message)) = x.pod_reason {
        status["reason"] = reason.into();
        status["message"] = message.into();
    }
    json!({ "status": status })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_message_keeps_the_tail_at_a_char_boundary() {
        let text = format!("{}{}", "x".repeat(10), "é".repeat(3000));
        let m = termination_message(Some(text.as_bytes()), b"", 1, true);
        assert!(m.len() <= MAX_TERMINATION_MESSAGE && m.len() >= MAX_TERMINATION_MESSAGE - 1);
        assert!(m.chars().all(|c| c == 'é'));
    }

    #[test]
    fn logs_only_when_failed_file_empty_and_asked() {
        assert_eq!(termination_message(Some(b""), b"boom\n", 2, true), "boom\n");
        assert_eq!(termination_message(None, b"boom\n", 2, true), "boom\n");
        assert_eq!(termination_message(Some(b""), b"boom\n", 0, true), "");
        assert_eq!(termination_message(Some(b""), b"boom\n", 2, false), "");
        assert_eq!(termination_message(Some(b"{}"), b"boom\n", 2, true), "{}");
    }

    #[test]
    fn log_fallback_is_80_lines_and_2048_bytes() {
        let log: String = (0..200).map(|i| format!("{i}\n")).collect();
        let m = log_fallback(log.as_bytes());
        assert!(m.starts_with("120\n") && m.ends_with("199\n"), "{m}");
        let long = "y".repeat(5000);
        assert_eq!(log_fallback(long.as_bytes()).len(), MAX_LOG_FALLBACK_BYTES);
    }
}
