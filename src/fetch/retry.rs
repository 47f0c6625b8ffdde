//! Retries with exponential backoff and jitter inside one time budget (`--timeout`),
//! and a guard that turns a stalled body into an error: a read never hangs a `cat`.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, ReadBuf};

/// How one attempt failed: transient failures (network, 5xx, cut or stalled streams)
/// are retried while the budget lasts; the rest (bad hash, missing object) are not.
#[derive(Debug)]
pub enum Attempt {
    Transient(String),
    Permanent(String),
}

#[derive(Clone, Copy, Debug)]
pub struct Policy {
    /// Total time for all attempts of one fetch.
    pub budget: Duration,
    /// Longest wait for the next bytes of a body.
    pub stall: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            budget: Duration::from_secs(30),
            stall: Duration::from_secs(10),
        }
    }
}

fn jitter(d: Duration) -> Duration {
    // Cheap randomness is enough to spread retries of many clients apart.
    let nanos = Instant::now().elapsed().subsec_nanos() as u64
        ^ std::process::id() as u64
        ^ (std::ptr::addr_of!(d) as u64);
    let frac = (nanos.wrapping_mul(6364136223846793005) >> 33) % 1000;
    d.mul_f64(0.5 + frac as f64 / 1000.0)
}

/// Runs `attempt(deadline)` until it succeeds, fails permanently, or the budget is
/// spent; returns the last error with the number of attempts.
pub async fn run<T, F, Fut>(policy: Policy, what: &str, attempt: F) -> Result<T, String>
where
    F: FnMut(Instant) -> Fut,
    Fut: Future<Output = Result<T, Attempt>>,
{
    run_with(policy, what, true, attempt).await
}

/// Like `run`; with `bound_attempts` false an attempt itself may outlast the budget
/// (a long NAR download that keeps making progress): the attempt bounds its own
/// waits, and the budget only limits when a new attempt may start.
pub async fn run_with<T, F, Fut>(
    policy: Policy,
    what: &str,
    bound_attempts: bool,
    mut attempt: F,
) -> Result<T, String>
where
    F: FnMut(Instant) -> Fut,
    Fut: Future<Output = Result<T, Attempt>>,
{
    let start = Instant::now();
    let deadline = start + policy.budget;
    let mut backoff = Duration::from_millis(100);
    for n in 1.. {
        let left = if bound_attempts {
            deadline.saturating_duration_since(Instant::now())
        } else {
            Duration::MAX
        };
        let r = match tokio::time::timeout(left, attempt(deadline)).await {
            Ok(r) => r,
            Err(_) => Err(Attempt::Transient(format!(
                "no answer within {:?}",
                policy.budget
            ))),
        };
        match r {
            Ok(v) => return Ok(v),
            Err(Attempt::Permanent(e)) => return Err(e),
            Err(Attempt::Transient(e)) => {
                let wait = jitter(backoff);
                if Instant::now() + wait >= deadline {
                    return Err(format!(
                        "{e} (gave up after {n} attempts in {:.1} s)",
                        start.elapsed().as_secs_f64()
                    ));
                }
                tracing::warn!(
                    "{what}: {e}; retrying in {} ms (attempt {n})",
                    wait.as_millis()
                );
                tokio::time::sleep(wait).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
    unreachable!()
}

/// A permit of `sem`, waited for at most `budget`: a reader never queues without end
/// behind others (then it gets EIO, and its next access tries afresh).
pub async fn permit<'a>(
    sem: &'a tokio::sync::Semaphore,
    budget: Duration,
    what: &str,
) -> Result<tokio::sync::SemaphorePermit<'a>, String> {
    match tokio::time::timeout(budget, sem.acquire()).await {
        Ok(Ok(p)) => Ok(p),
        Ok(Err(_)) => Err(format!("{what}: shutting down")),
        Err(_) => Err(format!(
            "every {what} stayed busy for {budget:?} (--timeout)"
        )),
    }
}

/// Wraps a body: fails a read that makes no progress for `stall`, or that would end
/// after `deadline`, and remembers that the stream (not the data) failed.
pub struct Guarded<R> {
    inner: R,
    stall: Duration,
    deadline: Instant,
    timer: Pin<Box<tokio::time::Sleep>>,
    pub failed: Arc<AtomicBool>,
}

impl<R> Guarded<R> {
    pub fn new(inner: R, stall: Duration, deadline: Instant) -> Self {
        let at = (Instant::now() + stall).min(deadline);
        Guarded {
            inner,
            stall,
            deadline,
            timer: Box::pin(tokio::time::sleep_until(at.into())),
            failed: Arc::default(),
        }
    }

    /// Reports a failure to `failed` (shared by the streams of one download).
    pub fn failing_to(mut self, failed: Arc<AtomicBool>) -> Self {
        self.failed = failed;
        self
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Guarded<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    let at = (Instant::now() + self.stall).min(self.deadline);
                    self.timer.as_mut().reset(at.into());
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => {
                self.failed.store(true, Ordering::SeqCst);
                Poll::Ready(Err(e))
            }
            Poll::Pending => match self.timer.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    self.failed.store(true, Ordering::SeqCst);
                    let why = if Instant::now() >= self.deadline {
                        "the time budget ran out while reading".to_owned()
                    } else {
                        format!("the stream stalled for {:?}", self.stall)
                    };
                    Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::TimedOut, why)))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn retries_transient_until_success_and_stops_on_permanent() {
        let n = AtomicUsize::new(0);
        let p = Policy {
            budget: Duration::from_secs(5),
            stall: Duration::from_secs(1),
        };
        let r = run(p, "t", |_| {
            let k = n.fetch_add(1, Ordering::SeqCst);
            async move {
                if k < 2 {
                    Err(Attempt::Transient("503".into()))
                } else {
                    Ok(k)
                }
            }
        })
        .await;
        assert_eq!(r.unwrap(), 2);
        let r: Result<(), _> = run(p, "t", |_| async {
            Err(Attempt::Permanent("bad hash".into()))
        })
        .await;
        assert_eq!(r.unwrap_err(), "bad hash");
    }

    #[tokio::test]
    async fn gives_up_within_the_budget() {
        let p = Policy {
            budget: Duration::from_millis(800),
            stall: Duration::from_secs(1),
        };
        let t = Instant::now();
        let r: Result<(), _> = run(p, "t", |_| async {
            Err(Attempt::Transient("reset".into()))
        })
        .await;
        assert!(r.unwrap_err().contains("gave up after"));
        assert!(t.elapsed() < Duration::from_millis(1500));
        // an attempt that hangs is cut at the budget
        let t = Instant::now();
        let r: Result<(), _> = run(p, "t", |_| std::future::pending()).await;
        assert!(r.is_err());
        assert!(t.elapsed() < Duration::from_millis(1500));
    }

    #[tokio::test]
    async fn stalled_body_errors() {
        let (_w, r) = tokio::io::duplex(64);
        let mut g = Guarded::new(
            r,
            Duration::from_millis(200),
            Instant::now() + Duration::from_secs(5),
        );
        let failed = g.failed.clone();
        let mut buf = Vec::new();
        let e = g.read_to_end(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert!(failed.load(Ordering::SeqCst));
    }
}
