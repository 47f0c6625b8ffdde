//! One run of an expensive fetch per key however many callers wait for it.
//!
//! The work runs as its own task, so it completes (and its result is kept on disk)
//! even if every waiter goes away, e.g. an interrupted `cat`. The entry is removed when
//! the work ends, success or failure, so a failure is retried by the next caller rather
//! than remembered.

use futures::future::{BoxFuture, FutureExt, Shared};
use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

type Flight<V, E> = Shared<BoxFuture<'static, Result<V, Arc<E>>>>;

pub struct SingleFlight<K, V, E> {
    inflight: Arc<Mutex<HashMap<K, Flight<V, E>>>>,
}

impl<K, V, E> Default for SingleFlight<K, V, E> {
    fn default() -> Self {
        SingleFlight {
            inflight: Arc::default(),
        }
    }
}

impl<K, V, E> SingleFlight<K, V, E>
where
    K: Hash + Eq + Clone + Send + 'static,
    V: Clone + Send + Sync + 'static,
    E: Send + Sync + 'static + From<String>,
{
    /// Runs `work()` unless a run for `key` is already under way, and returns its result.
    pub async fn run<F, Fut>(&self, key: K, work: F) -> Result<V, Arc<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>> + Send + 'static,
    {
        let flight = {
            let mut map = self.inflight.lock().unwrap();
            if let Some(f) = map.get(&key) {
                f.clone()
            } else {
                let fut = work();
                let map_ref = self.inflight.clone();
                let k = key.clone();
                let handle = tokio::spawn(async move {
                    // removes the entry however the work ends, a panic included
                    struct Done<K: Hash + Eq, V, E>(
                        Arc<Mutex<HashMap<K, Flight<V, E>>>>,
                        Option<K>,
                    );
                    impl<K: Hash + Eq, V, E> Drop for Done<K, V, E> {
                        fn drop(&mut self) {
                            if let Some(k) = self.1.take() {
                                if let Ok(mut m) = self.0.lock() {
                                    m.remove(&k);
                                }
                            }
                        }
                    }
                    let _done = Done(map_ref, Some(k));
                    fut.await.map_err(Arc::new)
                });
                let f = async move {
                    handle.await.unwrap_or_else(|e| {
                        Err(Arc::new(E::from(format!("fetch task failed: {e}"))))
                    })
                }
                .boxed()
                .shared();
                map.insert(key, f.clone());
                f
            }
        };
        flight.await
    }

    pub fn in_flight(&self) -> usize {
        self.inflight.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_run_for_many_waiters_and_retry_after_failure() {
        let sf: Arc<SingleFlight<u32, u32, String>> = Arc::default();
        let runs = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let sf = sf.clone();
            let runs = runs.clone();
            tasks.push(tokio::spawn(async move {
                sf.run(1, || async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    Err::<u32, String>("boom".into())
                })
                .await
            }));
        }
        for t in tasks {
            assert_eq!(*t.await.unwrap().unwrap_err(), "boom");
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(sf.in_flight(), 0);
        // a failure is not remembered
        let r = sf.run(1, || async { Ok::<u32, String>(7) }).await;
        assert_eq!(r.unwrap(), 7);
    }
}
