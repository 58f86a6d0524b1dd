//! Conditions as the API conventions want them: a map keyed by type, each with
//! reason, message, `observedGeneration`, and a `lastTransitionTime` that moves only
//! when the status changes.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// Condition types.
pub mod types {
    /// The spec was checked and a Job may run (or why not).
    pub const ACCEPTED: &str = "Accepted";
    /// A conversion Job is running.
    pub const RUNNING: &str = "Running";
    /// The conversion finished and its output is published.
    pub const SUCCEEDED: &str = "Succeeded";
    /// The conversion failed.
    pub const FAILED: &str = "Failed";
    /// The output passed validation.
    pub const VALIDATED: &str = "Validated";
}

/// Sets (or adds) condition `type_`, keeping `lastTransitionTime` when the status
/// does not change.
pub fn set(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
    now: &Time,
) {
    let status = if status { "True" } else { "False" };
    set_status(conditions, type_, status, reason, message, generation, now);
}

/// Like [`set`], for `Unknown`.
pub fn set_unknown(
    conditions: &mut Vec<Condition>,
    type_: &str,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
    now: &Time,
) {
    set_status(
        conditions, type_, "Unknown", reason, message, generation, now,
    );
}

fn set_status(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: &str,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
    now: &Time,
) {
    // The apiserver limits condition messages to 32768 bytes.
    let message = shorten(&message.into(), 32_000);
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            if c.status != status {
                c.last_transition_time = now.clone();
            }
            c.status = status.into();
            c.reason = reason.into();
            c.message = message;
            c.observed_generation = generation;
        }
        None => conditions.push(Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message,
            observed_generation: generation,
            last_transition_time: now.clone(),
        }),
    }
}

/// `text` cut to at most `max` bytes, on a character boundary.
pub fn shorten(text: &str, max: usize) -> String {
    let mut cut = text.len().min(max);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text[..cut].to_owned()
}

/// Removes condition `type_`.
pub fn remove(conditions: &mut Vec<Condition>, type_: &str) {
    conditions.retain(|c| c.type_ != type_);
}

/// The condition `type_`, if present.
pub fn get<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// True when condition `type_` is `True`.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    get(conditions, type_).is_some_and(|c| c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn transition_time_moves_only_on_status_change() {
        let mut c = Vec::new();
        set(
            &mut c,
            types::RUNNING,
            true,
            "JobCreated",
            "started",
            Some(1),
            &at(10),
        );
        set(
            &mut c,
            types::RUNNING,
            true,
            "PodRunning",
            "still",
            Some(1),
            &at(20),
        );
        assert_eq!(c[0].last_transition_time, at(10));
        assert_eq!(c[0].reason, "PodRunning");
        set(
            &mut c,
            types::RUNNING,
            false,
            "Completed",
            "done",
            Some(2),
            &at(30),
        );
        assert_eq!(c[0].last_transition_time, at(30));
        assert_eq!(c[0].observed_generation, Some(2));
        assert_eq!(c.len(), 1);
    }
}
