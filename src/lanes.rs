//! Work side by side in one process: `K` lanes, each with its own rayon pool of `threads / K`
//! threads, so that the kernels inside a job run on their lane's share of the cores.
//!
//! Why: a training step does not scale perfectly over threads (serial bookkeeping between
//! kernels, a barrier after every product, short products split too finely). On 2 cores, two
//! runs of one thread each trained 1.5× the tokens a second of one run on both (`bench train`,
//! interleaved rounds). Sweeps run cells in lanes (`LocalSweep::lanes`); training runs the
//! micro-batches of an accumulated step in lanes (`RunOptions::lanes`).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;

use crate::{Error, Result};

/// What the caller does with a finished item: keep handing out items, or stop after the
/// running ones (an interrupted cell).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    Continue,
    Stop,
}

/// The lanes' thread pools (none for one lane: jobs then run in the caller's pool), and one
/// of all their threads for the last item.
pub struct Lanes {
    pools: Vec<rayon::ThreadPool>,
    wide: Option<rayon::ThreadPool>,
}

impl Lanes {
    /// `count` lanes sharing the current pool's threads (at least one each); 0 or 1 is one
    /// lane, the caller's.
    pub fn new(count: usize) -> Result<Self> {
        if count <= 1 {
            return Ok(Self {
                pools: Vec::new(),
                wide: None,
            });
        }
        let all = rayon::current_num_threads();
        let threads = (all / count).max(1);
        let pool = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .map_err(|e| {
                    Error::InvalidArgument(format!(
                        "could not start {count} lanes of {threads} threads: {e}"
                    ))
                })
        };
        let pools = (0..count).map(|_| pool(threads)).collect::<Result<_>>()?;
        Ok(Self {
            pools,
            wide: Some(pool(all)?),
        })
    }

    /// How many jobs run at once.
    pub fn count(&self) -> usize {
        self.pools.len().max(1)
    }

    /// Runs `job` on every item (with its index), lanes taking the next item as they free up,
    /// and hands each result to `done` on the caller's thread as it finishes. When there are
    /// more items than lanes, the last item to start runs on all the lanes' threads: the
    /// lanes that then find nothing left would idle through it (35 sweep cells on 2 lanes:
    /// the 18th round is one cell). Until the other lanes finish their items it shares the
    /// cores with them, which for items of equal length is moments.
    ///
    /// Items start in order. After an error, or `done` answering [`Next::Stop`], no further
    /// item starts; those running finish and are still handed to `done`. Returns the first
    /// error (a job's, or `done`'s).
    pub fn run<T, R, J, D>(&self, items: &[T], job: J, mut done: D) -> Result<()>
    where
        T: Sync,
        R: Send,
        J: Fn(usize, &T) -> Result<R> + Sync,
        D: FnMut(usize, R) -> Result<Next>,
    {
        if self.pools.is_empty() || items.len() <= 1 {
            for (i, item) in items.iter().enumerate() {
                let result = job(i, item)?;
                if done(i, result)? == Next::Stop {
                    break;
                }
            }
            return Ok(());
        }
        let next = AtomicUsize::new(0);
        let halt = AtomicBool::new(false);
        let last = (items.len() > self.pools.len()).then(|| items.len() - 1);
        let (sender, finished) = mpsc::channel::<(usize, Result<R>)>();
        std::thread::scope(|scope| {
            for lane in self.pools.iter().take(items.len()) {
                let (sender, next, halt, job) = (sender.clone(), &next, &halt, &job);
                let wide = self.wide.as_ref();
                scope.spawn(move || {
                    while !halt.load(Ordering::Acquire) {
                        let i = next.fetch_add(1, Ordering::AcqRel);
                        let Some(item) = items.get(i) else { break };
                        let pool = match wide {
                            Some(wide) if Some(i) == last => wide,
                            _ => lane,
                        };
                        let result = pool.install(|| job(i, item));
                        if result.is_err() {
                            // Before the caller hears of it: the other lanes start nothing more.
                            halt.store(true, Ordering::Release);
                        }
                        if sender.send((i, result)).is_err() {
                            break;
                        }
                    }
                });
            }
            // The lanes hold the only senders left: the loop ends when the last lane does.
            drop(sender);
            let mut first_error = None;
            for (i, result) in finished {
                match result.and_then(|r| done(i, r)) {
                    Ok(Next::Continue) => {}
                    Ok(Next::Stop) => halt.store(true, Ordering::Release),
                    Err(e) => {
                        halt.store(true, Ordering::Release);
                        first_error.get_or_insert(e);
                    }
                }
            }
            first_error.map_or(Ok(()), Err)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::sync::Mutex;
    use std::time::Duration;

    #[test]
    fn every_item_runs_once_on_a_lane_of_its_share_of_the_threads_the_last_on_all() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(4)
            .build()
            .unwrap();
        let items: Vec<usize> = (0..9).map(|i| i * 10).collect();
        let seen = Mutex::new(Vec::new());
        let mut done_order = Vec::new();
        let lanes = pool.install(|| Lanes::new(2)).unwrap();
        assert_eq!(lanes.count(), 2);
        lanes
            .run(
                &items,
                |i, &item| {
                    seen.lock().unwrap().push(i);
                    Ok((item, rayon::current_num_threads()))
                },
                |i, (item, threads)| {
                    assert_eq!(item, i * 10);
                    let want = if i == 8 { 4 } else { 2 };
                    assert_eq!(
                        threads, want,
                        "4 threads over 2 lanes, all for the last item"
                    );
                    done_order.push(i);
                    Ok(Next::Continue)
                },
            )
            .unwrap();
        let seen: BTreeSet<usize> = seen.into_inner().unwrap().into_iter().collect();
        assert_eq!(seen, (0..9).collect());
        done_order.sort_unstable();
        assert_eq!(done_order, (0..9).collect::<Vec<_>>());
        // No more items than lanes: all start at once, each on its lane.
        let mut threads = Vec::new();
        lanes
            .run(
                &[0, 1],
                |_, _| Ok(rayon::current_num_threads()),
                |_, t| {
                    threads.push(t);
                    Ok(Next::Continue)
                },
            )
            .unwrap();
        assert_eq!(threads, [2, 2]);
    }

    #[test]
    fn two_lanes_run_at_the_same_time() {
        // Each job waits until both have started: one after another, this would never end.
        let started = AtomicUsize::new(0);
        Lanes::new(2)
            .unwrap()
            .run(
                &[0, 1],
                |_, _| {
                    started.fetch_add(1, Ordering::SeqCst);
                    let deadline = std::time::Instant::now() + Duration::from_secs(20);
                    while started.load(Ordering::SeqCst) < 2 {
                        assert!(
                            std::time::Instant::now() < deadline,
                            "the lanes ran in turn"
                        );
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Ok(())
                },
                |_, ()| Ok(Next::Continue),
            )
            .unwrap();
        assert_eq!(started.load(Ordering::SeqCst), 2);
    }

    /// Runs items 0..6 on `lanes`: item 0 at once, with `first` as its result; the others wait
    /// for it and then take 100 ms, so a stop after item 0 lands while they run. Returns how
    /// many started, what reached `done`, and the error.
    fn stop_after_the_first(
        lanes: usize,
        first: Result<usize>,
    ) -> (usize, Vec<usize>, Option<Error>) {
        let first = Mutex::new(Some(first));
        let (ran, first_done) = (AtomicUsize::new(0), AtomicBool::new(false));
        let mut reported = Vec::new();
        let result = Lanes::new(lanes).unwrap().run(
            &[0, 1, 2, 3, 4, 5],
            |_, &i| {
                ran.fetch_add(1, Ordering::SeqCst);
                if i == 0 {
                    first_done.store(true, Ordering::SeqCst);
                    return first.lock().unwrap().take().unwrap();
                }
                while !first_done.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                std::thread::sleep(Duration::from_millis(100));
                Ok(i)
            },
            |_, i| {
                reported.push(i);
                Ok(if i == 0 { Next::Stop } else { Next::Continue })
            },
        );
        (ran.load(Ordering::SeqCst), reported, result.err())
    }

    #[test]
    fn an_error_or_a_stop_starts_nothing_more_and_the_running_items_still_report() {
        let broke = || Err(Error::InvalidArgument("item 0 broke".into()));
        // One after another: nothing after the first.
        let (ran, reported, err) = stop_after_the_first(1, Ok(0));
        assert_eq!((ran, reported, err.is_none()), (1, vec![0], true));
        let (ran, reported, err) = stop_after_the_first(1, broke());
        assert_eq!((ran, reported.len()), (1, 0));
        assert!(err.unwrap().to_string().contains("item 0 broke"));
        // Two lanes: at most the item each lane held when the first one ended, and those
        // still report.
        let (ran, reported, err) = stop_after_the_first(2, Ok(0));
        assert!(err.is_none());
        assert!(ran <= 3, "{ran} started");
        assert_eq!(reported.len(), ran);
        let (ran, reported, err) = stop_after_the_first(2, broke());
        assert!(err.unwrap().to_string().contains("item 0 broke"));
        assert!(ran <= 2, "{ran} started");
        assert_eq!(
            reported.len(),
            ran - 1,
            "every item but the failed one reports"
        );
    }
}
