//! The one writer of a function's replica count. Every PATCH of `/scale` goes through
//! [`Writer::set`], which waits until this scaler may write (leader, inside its local
//! deadline) and guards the one write that can lose work: a PATCH to zero.
//!
//! A poke racing a scale-down to zero wins. Demand is re-read just before the PATCH to
//! zero (work seen → no PATCH), and again just after it: work that arrived in between
//! is answered at once with a PATCH back up, without waiting for the next tick.

use std::{fmt, sync::Arc, time::Instant};

use blink_crds::FunctionKey;

use crate::{
    demand::Demand,
    leader::Leadership,
    target::{Replicas, ScaleTarget, TargetError, TargetRef},
};

/// Called between the re-read of demand and the PATCH to zero; tests put a poke there.
pub type Seam = Arc<dyn Fn() + Send + Sync>;

#[derive(Clone)]
pub struct Writer {
    scale: Arc<dyn ScaleTarget>,
    demand: Arc<Demand>,
    leadership: Leadership,
    before_patch_to_zero: Option<Seam>,
}

impl fmt::Debug for Writer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Writer").finish_non_exhaustive()
    }
}

/// What a [`Writer::set`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Written {
    /// The count was set.
    Set(Replicas),
    /// A PATCH to zero was not sent: work was held for the function.
    ZeroVetoed,
    /// A PATCH to zero was sent, work arrived meanwhile, and the count was set back to
    /// `wake` at once.
    ZeroRewoken(Replicas),
    /// Nothing was written: the term as leader the decision was made in ended while
    /// the write waited for a renewal. The next term starts from the cluster's state.
    TermEnded,
}

impl Writer {
    pub fn new(scale: Arc<dyn ScaleTarget>, demand: Arc<Demand>, leadership: Leadership) -> Self {
        Self {
            scale,
            demand,
            leadership,
            before_patch_to_zero: None,
        }
    }

    pub fn with_seam(mut self, seam: Seam) -> Self {
        self.before_patch_to_zero = Some(seam);
        self
    }

    pub fn scale(&self) -> &Arc<dyn ScaleTarget> {
        &self.scale
    }

    /// Sets `target` to `replicas`. `wake` is the count to go back to if work shows up
    /// during a PATCH to zero (`max(min, 1)`).
    pub async fn set(
        &self,
        key: &FunctionKey,
        target: &TargetRef,
        replicas: i32,
        wake: i32,
    ) -> Result<Written, TargetError> {
        let term = self.leadership.state().term();
        if self.leadership.writable().await.term() != term {
            return Ok(Written::TermEnded);
        }
        if replicas != 0 {
            return self.scale.set(target, replicas).await.map(Written::Set);
        }
        if self.work_held(key) {
            return Ok(Written::ZeroVetoed);
        }
        if let Some(seam) = &self.before_patch_to_zero {
            seam();
        }
        let set = self.scale.set(target, 0).await?;
        if self.work_held(key) {
            self.leadership.writable().await;
            let back = self.scale.set(target, wake.max(1)).await?;
            return Ok(Written::ZeroRewoken(back));
        }
        Ok(Written::Set(set))
    }

    fn work_held(&self, key: &FunctionKey) -> bool {
        let demand = self.demand.aggregate(key, Instant::now());
        demand.held_work || demand.active
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Mutex, time::Duration};

    use blink_crds::Poke;

    use super::*;
    use crate::demand::DemandConfig;

    /// Records every count it is set to.
    #[derive(Debug, Default)]
    struct Recorded {
        sets: Mutex<Vec<i32>>,
    }

    impl ScaleTarget for Recorded {
        fn get(
            &self,
            _: &TargetRef,
        ) -> futures::future::BoxFuture<'_, Result<Replicas, TargetError>> {
            Box::pin(async { Ok(Replicas::default()) })
        }

        fn set(
            &self,
            _: &TargetRef,
            replicas: i32,
        ) -> futures::future::BoxFuture<'_, Result<Replicas, TargetError>> {
            if let Ok(mut sets) = self.sets.lock() {
                sets.push(replicas);
            }
            Box::pin(async move {
                Ok(Replicas {
                    desired: replicas,
                    current: replicas,
                })
            })
        }

        fn placement(
            &self,
            _: &TargetRef,
            _: std::time::Duration,
        ) -> futures::future::BoxFuture<'_, Result<crate::target::Placement, TargetError>> {
            Box::pin(async {
                Ok(crate::target::Placement {
                    stalled: 0,
                    all_placed: true,
                })
            })
        }
    }

    fn setup() -> (Arc<Recorded>, Arc<Demand>, Writer, FunctionKey, TargetRef) {
        let target = Arc::new(Recorded::default());
        let demand = Demand::new(DemandConfig::default());
        let writer = Writer::new(
            target.clone(),
            demand.clone(),
            Leadership::always(Instant::now()),
        );
        let key: FunctionKey = "ns/web".parse().expect("key");
        let target_ref = TargetRef {
            namespace: "ns".into(),
            api_version: "apps/v1".into(),
            kind: "Deployment".into(),
            name: "web".into(),
        };
        (target, demand, writer, key, target_ref)
    }

    fn poke(demand: &Demand, key: &FunctionKey) {
        demand.apply_poke(
            Poke {
                activator: "a-0".into(),
                session: "s".into(),
                key: key.clone(),
            },
            Instant::now(),
        );
    }

    fn sets(target: &Recorded) -> Vec<i32> {
        target.sets.lock().expect("lock").clone()
    }

    #[tokio::test]
    async fn a_quiet_function_goes_to_zero() {
        let (target, _, writer, key, target_ref) = setup();
        let written = writer.set(&key, &target_ref, 0, 1).await.expect("set");
        assert!(matches!(written, Written::Set(Replicas { desired: 0, .. })));
        assert_eq!(sets(&target), [0]);
    }

    #[tokio::test]
    async fn work_held_before_the_patch_vetoes_it() {
        let (target, demand, writer, key, target_ref) = setup();
        poke(&demand, &key);
        let written = writer.set(&key, &target_ref, 0, 1).await.expect("set");
        assert_eq!(written, Written::ZeroVetoed);
        assert!(sets(&target).is_empty(), "no PATCH to zero with work held");
    }

    #[tokio::test]
    async fn a_poke_racing_the_patch_to_zero_wins() {
        let (target, demand, writer, key, target_ref) = setup();
        let (seam_demand, seam_key) = (demand.clone(), key.clone());
        // The poke lands after the re-read of demand and before the PATCH.
        let writer = writer.with_seam(Arc::new(move || poke(&seam_demand, &seam_key)));
        let written = writer.set(&key, &target_ref, 0, 2).await.expect("set");
        assert!(
            matches!(written, Written::ZeroRewoken(Replicas { desired: 2, .. })),
            "{written:?}"
        );
        assert_eq!(sets(&target), [0, 2], "woken again at once");
    }

    #[tokio::test]
    async fn a_decision_waiting_for_a_renewal_is_dropped_when_its_term_ends() {
        let t0 = Instant::now();
        let leader = |acquired_at: Instant, deadline: Instant| crate::leader::LeaderState {
            is_leader: true,
            holder: Some("me".into()),
            acquired_at: Some(acquired_at),
            deadline: Some(deadline),
        };
        let (target, demand, _, key, target_ref) = setup();
        for (renewal, expected_sets) in [
            // A renewal of the same term: the write goes out.
            (leader(t0, t0 + Duration::from_secs(3600)), vec![5]),
            // Lost and won back while waiting: a new term, nothing written.
            (
                leader(t0 + Duration::from_secs(1), t0 + Duration::from_secs(3600)),
                vec![],
            ),
        ] {
            target.sets.lock().expect("lock").clear();
            // Past its deadline: the write waits for a renewal.
            let (leadership, control) = Leadership::manual(leader(t0, t0));
            let writer = Writer::new(target.clone(), demand.clone(), leadership);
            let (key, target_ref) = (key.clone(), target_ref.clone());
            let write = tokio::spawn(async move { writer.set(&key, &target_ref, 5, 1).await });
            tokio::task::yield_now().await;
            assert!(sets(&target).is_empty(), "written past the deadline");
            let new_term = renewal.acquired_at != Some(t0);
            control.set(renewal);
            let written = tokio::time::timeout(Duration::from_secs(5), write)
                .await
                .expect("the write ends")
                .expect("no panic")
                .expect("no error");
            assert_eq!(written == Written::TermEnded, new_term, "{written:?}");
            assert_eq!(sets(&target), expected_sets);
        }
    }

    #[tokio::test]
    async fn non_zero_counts_are_set_without_a_guard() {
        let (target, demand, writer, key, target_ref) = setup();
        poke(&demand, &key);
        let written = writer.set(&key, &target_ref, 5, 1).await.expect("set");
        assert!(matches!(written, Written::Set(Replicas { desired: 5, .. })));
        assert_eq!(sets(&target), [5]);
    }
}
