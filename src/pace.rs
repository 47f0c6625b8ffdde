//! Demand before prefetch. Behind a slow link every byte a reference prefetch
//! downloads is a byte a waiting reader does not get, so a prefetch starts only while
//! no reader waits for the network, and a prefetch under way pauses (stops reading its
//! stream: TCP backpressure frees the link) while one does. A reader that comes to want
//! the very object a prefetch is fetching lifts the pause for it: it waits on that
//! prefetch.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::watch;

/// The longest a prefetch stream stays paused at once: it then reads a little, so the
/// server does not give up on a connection that went quiet.
pub const MAX_PAUSE: Duration = Duration::from_secs(10);

/// The longest a prefetch waits to start while readers keep the link busy.
pub const MAX_START_WAIT: Duration = Duration::from_secs(30);

#[derive(Default, Debug)]
struct Waiting {
    /// Readers waiting for the network now.
    readers: usize,
    /// The objects (storage keys) they wait for, with how many wait for each.
    objects: HashMap<String, usize>,
}

/// Who is waiting for the network: shared by every fetch of a mount.
#[derive(Clone)]
pub struct Demands(Arc<watch::Sender<Waiting>>);

impl Default for Demands {
    fn default() -> Self {
        Demands(Arc::new(watch::Sender::new(Waiting::default())))
    }
}

impl Demands {
    /// A reader waits for `object` until the guard is dropped.
    pub fn wait_for(&self, object: &str) -> Demand {
        self.0.send_modify(|w| {
            w.readers += 1;
            *w.objects.entry(object.to_owned()).or_default() += 1;
        });
        Demand {
            demands: self.0.clone(),
            object: object.to_owned(),
        }
    }

    /// Pacing for a prefetch of `object`.
    pub fn pace(&self, object: &str) -> Pace {
        Pace {
            rx: self.0.subscribe(),
            object: object.to_owned(),
            paused: None,
        }
    }

    /// Readers waiting now.
    pub fn readers(&self) -> usize {
        self.0.borrow().readers
    }
}

/// A reader waiting (see [`Demands::wait_for`]).
pub struct Demand {
    demands: Arc<watch::Sender<Waiting>>,
    object: String,
}

impl Drop for Demand {
    fn drop(&mut self) {
        self.demands.send_modify(|w| {
            w.readers -= 1;
            if let Some(n) = w.objects.get_mut(&self.object) {
                *n -= 1;
                if *n == 0 {
                    w.objects.remove(&self.object);
                }
            }
        });
    }
}

/// A prefetch's view of the readers: it may go on while none waits, or while one waits
/// for the object it fetches.
pub struct Pace {
    rx: watch::Receiver<Waiting>,
    object: String,
    paused: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl Pace {
    fn may_go(w: &Waiting, object: &str) -> bool {
        w.readers == 0 || w.objects.contains_key(object)
    }

    /// Whether the prefetch must make way now.
    pub fn yields(&self) -> bool {
        !Self::may_go(&self.rx.borrow(), &self.object)
    }

    /// Waits until the prefetch may go on, or `max` passed.
    pub fn until_free(&self, max: Duration) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.rx.clone();
        let object = self.object.clone();
        async move {
            let _ = tokio::time::timeout(max, rx.wait_for(|w| Self::may_go(w, &object))).await;
        }
    }

    /// Poll form of `until_free(MAX_PAUSE)` for streams: `Ready(true)` after a pause
    /// (so a stall timer can be restarted), `Ready(false)` if there was none.
    pub fn poll_free(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        if self.paused.is_none() {
            if !self.yields() {
                return Poll::Ready(false);
            }
            tracing::debug!(object = %self.object, "prefetch paused: a reader waits for the network");
            let mut rx = self.rx.clone();
            let object = self.object.clone();
            self.paused = Some(Box::pin(async move {
                let _ = tokio::time::timeout(MAX_PAUSE, rx.wait_for(|w| Self::may_go(w, &object)))
                    .await;
            }));
        }
        let fut = self.paused.as_mut().expect("set above");
        match fut.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.paused = None;
                Poll::Ready(true)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_prefetch_yields_to_readers_of_other_objects_only() {
        let d = Demands::default();
        let p = d.pace("nar/a");
        assert!(!p.yields());
        let r = d.wait_for("nar/b");
        assert!(p.yields());
        let same = d.wait_for("nar/a");
        assert!(!p.yields(), "a reader of its own object lifts the pause");
        drop(same);
        assert!(p.yields());
        drop(r);
        assert!(!p.yields());
        assert_eq!(d.readers(), 0);
    }

    #[tokio::test]
    async fn a_paused_prefetch_resumes_when_the_reader_is_served() {
        let d = Demands::default();
        let mut p = d.pace("nar/a");
        let r = d.wait_for("nar/b");
        let t = tokio::time::Instant::now();
        let resumed = tokio::spawn(async move { std::future::poll_fn(|cx| p.poll_free(cx)).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!resumed.is_finished());
        drop(r);
        assert!(resumed.await.unwrap());
        assert!(t.elapsed() < MAX_PAUSE);
    }

    #[tokio::test]
    async fn a_reader_joining_the_prefetch_lifts_its_pause_at_once() {
        let d = Demands::default();
        let p = d.pace("nar/a");
        let _other = d.wait_for("nar/b");
        let waiter = tokio::spawn(async move { p.until_free(MAX_START_WAIT).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiter.is_finished());
        let _joined = d.wait_for("nar/a");
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("resumed")
            .unwrap();
    }
}
