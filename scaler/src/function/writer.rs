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
        self.leadership.writable().await;
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
