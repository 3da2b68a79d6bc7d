//! A future run beside a connection and polled only when it has been woken.
//!
//! A connection's task is woken a few times per exchange (the client's request, the
//! replica's answer). Beside the connection it waits for its idle watch and for the
//! drain; in a `select!`, both were polled at every one of those wakes, each
//! registering its waker again (a timer entry, a `Notify` waiter under its lock) to
//! learn nothing. [`WithSide`] gives the side future a waker of its own and polls it
//! only after that waker fired, so on the warm path it costs a flag check per poll.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, Wake, Waker},
};

/// What finished first.
#[derive(Debug, PartialEq, Eq)]
pub enum Finished<M, S> {
    Main(M),
    Side(S),
}

/// Runs `main` and `side` until either finishes; `side` is polled once at the start
/// and then only when it asked to be.
#[derive(Debug)]
pub struct WithSide<M, S> {
    main: M,
    side: S,
    signal: Arc<SideSignal>,
    /// The task's waker as last given to `signal`: compared on every poll (a pointer
    /// comparison), handed over only when the task's waker changes.
    task: Option<Waker>,
}

/// The side future's waker: marks it due, then wakes the task.
#[derive(Debug)]
struct SideSignal {
    due: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl Wake for SideSignal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.due.store(true, Ordering::Release);
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(task) = task.as_ref() {
            task.wake_by_ref();
        }
    }
}

impl<M, S> WithSide<M, S> {
    pub fn new(main: M, side: S) -> Self {
        let signal = SideSignal {
            due: AtomicBool::new(true),
            task: Mutex::new(None),
        };
        Self {
            main,
            side,
            signal: Arc::new(signal),
            task: None,
        }
    }
}

impl<M, S> Future for WithSide<M, S>
where
    M: Future + Unpin,
    S: Future + Unpin,
{
    type Output = Finished<M::Output, S::Output>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        if !this.task.as_ref().is_some_and(|t| t.will_wake(cx.waker())) {
            let waker = cx.waker().clone();
            *this.signal.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(waker.clone());
            this.task = Some(waker);
        }
        if this.signal.due.swap(false, Ordering::AcqRel) {
            let waker = Waker::from(this.signal.clone());
            if let Poll::Ready(output) =
                Pin::new(&mut this.side).poll(&mut Context::from_waker(&waker))
            {
                return Poll::Ready(Finished::Side(output));
            }
        }
        Pin::new(&mut this.main).poll(cx).map(Finished::Main)
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::atomic::AtomicUsize, time::Duration};

    use tokio::sync::{Notify, oneshot};

    use super::*;

    /// A future that counts its polls and stays pending until told.
    struct Counted<F> {
        inner: F,
        polls: Arc<AtomicUsize>,
    }

    impl<F: Future + Unpin> Future for Counted<F> {
        type Output = F::Output;
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
            self.polls.fetch_add(1, Ordering::Relaxed);
            Pin::new(&mut self.inner).poll(cx)
        }
    }

    #[tokio::test]
    async fn the_side_is_polled_only_when_woken_and_main_wakes_do_not_poll_it() {
        let side_polls = Arc::new(AtomicUsize::new(0));
        let (side_tx, side_rx) = oneshot::channel::<&str>();
        let side = Counted {
            inner: side_rx,
            polls: side_polls.clone(),
        };
        // Main: woken many times (a Notify), done after 100 wakes.
        let notify = Arc::new(Notify::new());
        let main = Box::pin({
            let notify = notify.clone();
            async move {
                for _ in 0..100 {
                    notify.notified().await;
                }
                "main"
            }
        });
        let waker_side = tokio::spawn(async move {
            for _ in 0..100 {
                notify.notify_one();
                tokio::task::yield_now().await;
            }
        });
        let finished = WithSide::new(main, side).await;
        waker_side.await.expect("the waking task ended");
        assert_eq!(finished, Finished::Main("main"));
        assert_eq!(
            side_polls.load(Ordering::Relaxed),
            1,
            "polled only at the start"
        );
        drop(side_tx);
    }

    #[tokio::test]
    async fn a_woken_side_finishes_first_and_main_can_go_on_after() {
        let (side_tx, side_rx) = oneshot::channel::<&str>();
        let mut main = Box::pin(async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            "main"
        });
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let _ = side_tx.send("side");
        });
        let finished = WithSide::new(main.as_mut(), side_rx).await;
        assert_eq!(finished, Finished::Side(Ok("side")));
        // The main future was only borrowed: it runs to its end afterwards.
        assert_eq!(main.await, "main");
    }

    #[tokio::test]
    async fn a_side_woken_between_polls_is_seen_even_when_main_woke_too() {
        let (side_tx, side_rx) = oneshot::channel::<()>();
        let notify = Arc::new(Notify::new());
        let main = Box::pin({
            let notify = notify.clone();
            async move {
                notify.notified().await;
                std::future::pending::<()>().await;
            }
        });
        tokio::spawn(async move {
            tokio::task::yield_now().await;
            // Both wake the task before it runs again.
            let _ = side_tx.send(());
            notify.notify_one();
        });
        let finished = tokio::time::timeout(Duration::from_secs(5), WithSide::new(main, side_rx))
            .await
            .expect("the side's wake was lost");
        assert!(matches!(finished, Finished::Side(Ok(()))));
    }
}
