//! Demand before prefetch. Behind a slow link every byte a reference prefetch
//! downloads is a byte a waiting reader does not get, so a prefetch starts only while
//! no reader waits for the network, and a prefetch under way that a reader outlasts
//! lets go of its connection (merely not reading would not free the link: the
//! kernel's receive buffer takes megabytes first) and goes on from where it stopped,
//! with a Range GET, once no reader waits. A reader whose download outpaces its
//! decoding waits for the CPU, not the link: it holds up no prefetch. A reader (or a
//! traversal) that comes to want the very object a prefetch is fetching lifts the
//! pause for it: it waits on that prefetch.

use futures::future::BoxFuture;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::watch;

/// Who wants a NAR: a reader waiting for it; a traversal about to read it (it looked
/// into the path); or reference prefetch guessing it will be wanted, which makes way
/// for readers (see below). Only a reader may evict anything from the disk cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    Demand,
    Ahead,
    Prefetch,
}

/// How long a prefetch keeps its connection while a reader waits: most readers are
/// served from the disk cache or a small object in less.
pub const GRACE: Duration = Duration::from_millis(100);

/// The longest a prefetch waits (to start, or to go on) while readers keep the link
/// busy: then it goes on anyway, so it is never starved for good.
pub const MAX_START_WAIT: Duration = Duration::from_secs(30);

/// What a prefetch that waited `MAX_START_WAIT` reads before it makes way again: going
/// on only to pause at once would be no progress at all.
pub const PROMISED: u64 = 1 << 20;

/// The objects (storage keys) readers wait for now.
#[derive(Default, Debug)]
struct Waiting {
    objects: HashMap<String, Wanted>,
}

#[derive(Default, Debug)]
struct Wanted {
    readers: usize,
    /// Traversals about to read it (priority `Ahead`): they hold up no prefetch, but
    /// lift the pause of a prefetch of this very object.
    ahead: usize,
    /// Its download outpaces its decoding: the reader waits for the CPU, not for the
    /// link, which has room for prefetches (on a fast network they keep both cores
    /// busy, as `nix copy` does).
    fed: bool,
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
        self.want(object, false)
    }

    /// A traversal is about to read `object` (see `Wanted::ahead`).
    pub fn ahead(&self, object: &str) -> Demand {
        self.want(object, true)
    }

    fn want(&self, object: &str, ahead: bool) -> Demand {
        self.0.send_modify(|w| {
            let wanted = w.objects.entry(object.to_owned()).or_default();
            if ahead {
                wanted.ahead += 1;
            } else {
                wanted.readers += 1;
            }
        });
        Demand {
            demands: self.0.clone(),
            object: object.to_owned(),
            ahead,
        }
    }

    /// Pacing for a prefetch of `object`.
    pub fn pace(&self, object: &str) -> Pace {
        Pace {
            rx: self.0.subscribe(),
            object: object.to_owned(),
        }
    }

    /// Whether the download of `object` outpaces its decoding (see `Wanted::fed`).
    pub fn fed(&self, object: &str, fed: bool) {
        self.0
            .send_if_modified(|w| match w.objects.get_mut(object) {
                Some(wanted) if wanted.fed != fed => {
                    wanted.fed = fed;
                    true
                }
                _ => false,
            });
    }

    /// Readers waiting now.
    pub fn readers(&self) -> usize {
        self.0.borrow().objects.values().map(|w| w.readers).sum()
    }
}

/// A reader waiting (see [`Demands::wait_for`]).
pub struct Demand {
    demands: Arc<watch::Sender<Waiting>>,
    object: String,
    ahead: bool,
}

impl Drop for Demand {
    fn drop(&mut self) {
        self.demands.send_modify(|w| {
            if let Some(wanted) = w.objects.get_mut(&self.object) {
                if self.ahead {
                    wanted.ahead -= 1;
                } else {
                    wanted.readers -= 1;
                }
                if wanted.readers == 0 && wanted.ahead == 0 {
                    w.objects.remove(&self.object);
                }
            }
        });
    }
}

/// A prefetch's view of the readers: it may go on while none waits, or while one waits
/// for the object it fetches.
#[derive(Clone)]
pub struct Pace {
    rx: watch::Receiver<Waiting>,
    object: String,
}

impl Pace {
    fn may_go(w: &Waiting, object: &str) -> bool {
        w.objects.contains_key(object)
            || w.objects
                .values()
                .all(|wanted| wanted.fed || wanted.readers == 0)
    }

    /// Whether the prefetch must make way now.
    pub fn yields(&self) -> bool {
        !Self::may_go(&self.rx.borrow(), &self.object)
    }

    /// Waits until the prefetch may go on (true), or `max` passed while readers kept
    /// the link busy (false: it goes on anyway, and is owed progress).
    pub fn until_free(&self, max: Duration) -> impl Future<Output = bool> + Send + 'static {
        let mut rx = self.rx.clone();
        let object = self.object.clone();
        async move {
            tokio::time::timeout(max, rx.wait_for(|w| Self::may_go(w, &object)))
                .await
                .is_ok()
        }
    }
}

/// Opens the rest of the object from a byte offset.
pub type Reopen = Box<dyn Fn(u64) -> BoxFuture<'static, std::io::Result<Body>> + Send + Sync>;
type Body = Pin<Box<dyn AsyncRead + Send>>;

/// A prefetch's stream that makes way for readers (see the module doc).
pub struct PacedBody {
    inner: Option<Body>,
    offset: u64,
    pace: Pace,
    reopen: Reopen,
    state: State,
    /// Bytes it reads before it makes way again (see `PROMISED`).
    promised: u64,
    /// Times it let go of its connection.
    pub parked: u64,
}

enum State {
    Reading,
    /// A reader waits: the connection is kept a moment.
    Grace(BoxFuture<'static, bool>),
    /// The connection is gone; back when no reader waits (or, owed progress, after
    /// `MAX_START_WAIT`).
    Parked(BoxFuture<'static, bool>),
    Opening(BoxFuture<'static, std::io::Result<Body>>),
}

impl PacedBody {
    /// `owed`: it already waited `MAX_START_WAIT` to start, so it reads `PROMISED`
    /// bytes before it makes way.
    pub fn new(inner: Body, pace: Pace, reopen: Reopen, owed: bool) -> Self {
        PacedBody {
            inner: Some(inner),
            offset: 0,
            pace,
            reopen,
            state: State::Reading,
            promised: if owed { PROMISED } else { 0 },
            parked: 0,
        }
    }
}

impl AsyncRead for PacedBody {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let me = &mut *self;
        loop {
            match &mut me.state {
                State::Reading => {
                    if me.promised == 0 && me.pace.yields() {
                        me.state = State::Grace(Box::pin(me.pace.until_free(GRACE)));
                        continue;
                    }
                    let Some(inner) = me.inner.as_mut() else {
                        me.state = State::Opening((me.reopen)(me.offset));
                        continue;
                    };
                    let before = buf.filled().len();
                    let r = inner.as_mut().poll_read(cx, buf);
                    if let Poll::Ready(Ok(())) = r {
                        let n = (buf.filled().len() - before) as u64;
                        me.offset += n;
                        me.promised = me.promised.saturating_sub(n);
                    }
                    return r;
                }
                State::Grace(f) => {
                    if f.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    if me.pace.yields() {
                        tracing::debug!(
                            object = %me.pace.object,
                            offset = me.offset,
                            "prefetch paused: a reader waits for the network"
                        );
                        me.inner = None;
                        me.parked += 1;
                        me.state = State::Parked(Box::pin(me.pace.until_free(MAX_START_WAIT)));
                    } else {
                        me.state = State::Reading;
                    }
                }
                State::Parked(f) => {
                    let Poll::Ready(free) = f.as_mut().poll(cx) else {
                        return Poll::Pending;
                    };
                    if !free {
                        me.promised = PROMISED;
                    }
                    tracing::debug!(object = %me.pace.object, offset = me.offset, owed = !free, "prefetch goes on");
                    me.state = State::Opening((me.reopen)(me.offset));
                }
                State::Opening(f) => match f.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(body)) => {
                        me.inner = Some(body);
                        me.state = State::Reading;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                },
            }
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
        // a reader whose download outpaces its decoding waits for the CPU: no pause
        d.fed("nar/b", true);
        assert!(!p.yields());
        d.fed("nar/b", false);
        assert!(p.yields());
        // a traversal about to read another object holds up nothing, one about to
        // read this very object lifts the pause
        let other = d.ahead("nar/c");
        assert!(p.yields());
        let own = d.ahead("nar/a");
        assert!(!p.yields());
        drop((own, other));
        assert!(p.yields());
        drop(r);
        assert!(!p.yields());
        assert_eq!(d.readers(), 0);
    }

    #[tokio::test]
    async fn a_prefetch_lets_go_of_its_connection_and_goes_on_where_it_stopped() {
        use std::sync::atomic::{AtomicU64, Ordering};
        use tokio::io::AsyncReadExt;
        let data: Arc<Vec<u8>> = Arc::new((0..100_000u32).map(|i| (i % 251) as u8).collect());
        let d = Demands::default();
        let opened_at = Arc::new(AtomicU64::new(u64::MAX));
        let (data2, opened) = (data.clone(), opened_at.clone());
        let reopen: Reopen = Box::new(move |offset| {
            opened.store(offset, Ordering::SeqCst);
            let rest = data2[offset as usize..].to_vec();
            Box::pin(async move { Ok(Box::pin(std::io::Cursor::new(rest)) as Body) })
        });
        let first: Body = Box::pin(std::io::Cursor::new(data.to_vec()));
        let mut body = PacedBody::new(first, d.pace("nar/a"), reopen, false);
        let mut got = vec![0u8; 30_000];
        body.read_exact(&mut got).await.unwrap();
        // a reader of another object outlasts the grace: the connection goes
        let reader = d.wait_for("nar/b");
        let t = tokio::time::Instant::now();
        let rest = tokio::spawn(async move {
            let mut rest = Vec::new();
            body.read_to_end(&mut rest).await.unwrap();
            (rest, body.parked)
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!rest.is_finished());
        assert_eq!(
            opened_at.load(Ordering::SeqCst),
            u64::MAX,
            "not reopened while parked"
        );
        drop(reader);
        let (rest, parked) = rest.await.unwrap();
        assert!(t.elapsed() < MAX_START_WAIT);
        assert_eq!(parked, 1);
        assert_eq!(
            opened_at.load(Ordering::SeqCst),
            30_000,
            "went on where it stopped"
        );
        got.extend(rest);
        assert_eq!(got, *data);
    }

    /// A reader that never stops waiting must not starve a prefetch for good: each
    /// time the prefetch has waited `MAX_START_WAIT` it reads `PROMISED` bytes.
    #[tokio::test(start_paused = true)]
    async fn a_prefetch_owed_progress_makes_progress_while_readers_keep_waiting() {
        use tokio::io::AsyncReadExt;
        let data: Arc<Vec<u8>> = Arc::new((0..(3 * PROMISED + 5)).map(|i| i as u8).collect());
        let d = Demands::default();
        let data2 = data.clone();
        let reopen: Reopen = Box::new(move |offset| {
            let rest = data2[offset as usize..].to_vec();
            Box::pin(async move { Ok(Box::pin(std::io::Cursor::new(rest)) as Body) })
        });
        let _forever = d.wait_for("nar/other");
        // it waited to start and was let go: owed progress from the first byte
        let first: Body = Box::pin(std::io::Cursor::new(data.to_vec()));
        let mut body = PacedBody::new(first, d.pace("nar/a"), reopen, true);
        let mut got = Vec::new();
        let t = tokio::time::Instant::now();
        tokio::time::timeout(MAX_START_WAIT * 10, body.read_to_end(&mut got))
            .await
            .expect("the prefetch made progress")
            .unwrap();
        assert_eq!(got, *data);
        assert!(body.parked >= 3, "it made way between its promised runs");
        assert!(t.elapsed() >= MAX_START_WAIT * 3);
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
