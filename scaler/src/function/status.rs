//! A function's status as Blink wants it, and when to write it: conditions keep their
//! transition time while their status holds, and writes are coalesced to at most one
//! per object per interval (DESIGN.md, "Acting on the cluster").

use std::time::{Duration, Instant};

use blink_crds::{Condition, ScaledObjectStatus};
use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};

/// The status to write and the bookkeeping that coalesces writes.
#[derive(Debug)]
pub struct StatusBook {
    wanted: ScaledObjectStatus,
    /// `wanted` differs from what was last written (a flag, not a copy of the written
    /// status: 10,000 functions would keep 10,000 copies).
    unwritten: bool,
    last_write: Option<Instant>,
    interval: Duration,
}

impl StatusBook {
    /// Starts from the status the object has, so a restart does not rewrite it.
    pub fn new(existing: Option<ScaledObjectStatus>, interval: Duration) -> Self {
        Self {
            unwritten: existing.is_none(),
            wanted: existing.unwrap_or_default(),
            last_write: None,
            interval,
        }
    }

    pub fn wanted(&self) -> &ScaledObjectStatus {
        &self.wanted
    }

    /// Sets a condition; its transition time moves only when its status changes.
    pub fn condition(
        &mut self,
        kind: &str,
        status: bool,
        reason: &str,
        message: impl Into<String>,
    ) {
        let mut next = Condition::new(kind, status, reason, message);
        let conditions = &mut self.wanted.conditions;
        match conditions.iter_mut().find(|c| c.condition_type == kind) {
            Some(existing) => {
                next.last_transition_time = if existing.status == next.status {
                    existing.last_transition_time.clone()
                } else {
                    Some(now())
                };
                if *existing != next {
                    *existing = next;
                    self.unwritten = true;
                }
            }
            None => {
                next.last_transition_time = Some(now());
                conditions.push(next);
                self.unwritten = true;
            }
        }
    }

    pub fn condition_is(&self, kind: &str, status: bool) -> bool {
        self.wanted
            .condition(kind)
            .is_some_and(|c| c.is_true() == status)
    }

    pub fn update(&mut self, edit: impl FnOnce(&mut ScaledObjectStatus)) {
        let before = self.wanted.clone();
        edit(&mut self.wanted);
        if self.wanted != before {
            self.unwritten = true;
        }
    }

    /// The status to write now, if it differs from what was written and the last write
    /// is at least one interval old; else `None` (see [`Self::next_write_at`]).
    pub fn due(&self, now: Instant) -> Option<ScaledObjectStatus> {
        if !self.unwritten {
            return None;
        }
        match self.last_write {
            Some(at) if now < at + self.interval => None,
            _ => Some(self.wanted.clone()),
        }
    }

    /// When a pending change may be written.
    pub fn next_write_at(&self) -> Option<Instant> {
        if !self.unwritten {
            return None;
        }
        Some(
            self.last_write
                .map_or_else(Instant::now, |at| at + self.interval),
        )
    }

    /// `status` was written at `at` (a failed write passes the default status: the
    /// wanted one is still to be written, after an interval).
    pub fn written(&mut self, status: ScaledObjectStatus, at: Instant) {
        self.unwritten = status != self.wanted;
        self.last_write = Some(at);
    }
}

pub fn now() -> Time {
    Time(Timestamp::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_coalesced_to_one_per_interval() {
        let start = Instant::now();
        let mut book = StatusBook::new(None, Duration::from_secs(1));
        book.update(|s| s.desired_replicas = Some(1));
        let first = book.due(start).expect("a change is due at once");
        book.written(first, start);
        assert_eq!(book.due(start), None, "nothing changed");
        book.update(|s| s.desired_replicas = Some(2));
        book.update(|s| s.desired_replicas = Some(3));
        assert_eq!(
            book.due(start + Duration::from_millis(500)),
            None,
            "too soon"
        );
        assert_eq!(book.next_write_at(), Some(start + Duration::from_secs(1)));
        let second = book
            .due(start + Duration::from_secs(1))
            .expect("due after 1 s");
        assert_eq!(
            second.desired_replicas,
            Some(3),
            "only the latest is written"
        );
    }

    #[test]
    fn transition_time_moves_only_on_a_status_change() {
        let mut book = StatusBook::new(None, Duration::from_secs(1));
        book.condition("Active", true, "TriggerActive", "a");
        let first = book.wanted().condition("Active").cloned().expect("set");
        book.condition("Active", true, "TriggerActive", "b");
        let same = book.wanted().condition("Active").cloned().expect("set");
        assert_eq!(first.last_transition_time, same.last_transition_time);
        assert_eq!(same.message.as_deref(), Some("b"));
        assert!(book.condition_is("Active", true));
        book.condition("Active", false, "Idle", "c");
        assert!(book.condition_is("Active", false));
        assert_eq!(book.wanted().conditions.len(), 1);
    }

    #[test]
    fn an_unchanged_existing_status_is_not_rewritten() {
        let existing = ScaledObjectStatus {
            desired_replicas: Some(4),
            ..Default::default()
        };
        let book = StatusBook::new(Some(existing), Duration::from_secs(1));
        assert_eq!(book.due(Instant::now()), None);
    }
}
