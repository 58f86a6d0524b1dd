//! Job creation at a bounded rate: a burst of resources (a GitOps sync of hundreds)
//! never floods the cluster with Jobs. Each resource that needs a Job reserves the
//! next free slot, at most `rate` per second across everything this operator
//! watches, and is looked at again when its slot comes, so a waiting resource
//! costs one more reconcile, not one per slot.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Slots for Job creations, `interval` apart.
#[derive(Debug)]
pub struct Pacer {
    interval: Duration,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// The first slot nobody has reserved.
    next: Instant,
    /// Slots reserved by resources that wait for them (`namespace/name`).
    reserved: HashMap<String, Instant>,
}

impl Pacer {
    /// At most `per_second` Job creations per second; `None`: no limit.
    pub fn new(per_second: Option<f64>) -> Pacer {
        let interval = per_second
            .filter(|r| r.is_finite() && *r > 0.0)
            .map_or(Duration::ZERO, |r| Duration::from_secs_f64(1.0 / r));
        Pacer {
            interval,
            state: Mutex::new(State {
                next: Instant::now(),
                reserved: HashMap::new(),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// May `key` create its Job now? `None`: yes (its slot is taken). `Some(wait)`:
    /// its slot comes after `wait`; ask again then.
    pub fn slot(&self, key: &str) -> Option<Duration> {
        self.slot_at(key, Instant::now())
    }

    fn slot_at(&self, key: &str, now: Instant) -> Option<Duration> {
        if self.interval.is_zero() {
            return None;
        }
        let mut s = self.state();
        let at = match s.reserved.get(key) {
            Some(at) => *at,
            None => {
                let at = s.next.max(now);
                s.next = at + self.interval;
                s.reserved.insert(key.to_owned(), at);
                at
            }
        };
        if at <= now {
            s.reserved.remove(key);
            None
        } else {
            Some(at - now)
        }
    }

    /// `key` no longer needs its slot (deleted, or no Job to create after all).
    pub fn forget(&self, key: &str) {
        self.state().reserved.remove(key);
    }

    /// Resources waiting for a slot.
    pub fn waiting(&self) -> usize {
        self.state().reserved.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_handed_out_at_the_rate_in_order() {
        let p = Pacer::new(Some(4.0));
        let t0 = Instant::now() + Duration::from_millis(1);
        assert_eq!(p.slot_at("a", t0), None);
        assert_eq!(p.slot_at("b", t0), Some(Duration::from_millis(250)));
        assert_eq!(p.slot_at("c", t0), Some(Duration::from_millis(500)));
        // Asking again keeps the reservation rather than taking a later slot.
        assert_eq!(
            p.slot_at("b", t0 + Duration::from_millis(100)),
            Some(Duration::from_millis(150))
        );
        assert_eq!(p.waiting(), 2);
        assert_eq!(p.slot_at("b", t0 + Duration::from_millis(250)), None);
        assert_eq!(p.slot_at("c", t0 + Duration::from_millis(600)), None);
        assert_eq!(p.waiting(), 0);
        // After a quiet spell, the next one goes at once, and the one after waits.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(p.slot_at("d", later), None);
        assert_eq!(p.slot_at("e", later), Some(Duration::from_millis(250)));
        p.forget("e");
        assert_eq!(p.waiting(), 0);
    }

    #[test]
    fn no_rate_means_no_wait() {
        let p = Pacer::new(None);
        let t0 = Instant::now();
        for k in ["a", "b", "c"] {
            assert_eq!(p.slot_at(k, t0), None);
        }
        assert_eq!(Pacer::new(Some(0.0)).slot_at("a", t0), None);
    }
}
