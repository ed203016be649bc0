//! A doorbell: how a producer wakes a consumer thread that sleeps until work arrives in a
//! lock-free queue.
//!
//! Owns only its wake-up state. Ringing costs a fence and a load while the consumer is awake
//! (the common case under load) and a futex wake only when it sleeps; waiting never spins or
//! yields (crossbeam-channel's blocking receive spins and calls `sched_yield` up to ten times
//! first, which on a small machine cost more CPU per instance than storing it). Must never hold
//! work itself: the queue does, and the consumer re-checks it before sleeping.
//!
//! Lost wake-ups are excluded by the classic store-fence-load pairing: the producer publishes its
//! item, fences, then reads `sleepers`; the consumer counts itself in `sleepers`, fences, then
//! re-checks the queue under the mutex. At least one of them sees the other, and the notify
//! cannot fall between the consumer's re-check and its wait because both hold the mutex.

#![forbid(unsafe_code)]

use std::sync::atomic::{fence, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::Duration;

#[derive(Debug, Default)]
pub struct Doorbell {
    sleepers: AtomicUsize,
    rung: Mutex<bool>,
    cv: Condvar,
}

impl Doorbell {
    pub fn new() -> Doorbell {
        Doorbell::default()
    }

    /// Call after publishing work: wakes one sleeping consumer, if any.
    pub fn ring(&self) {
        fence(Ordering::SeqCst);
        if self.sleepers.load(Ordering::SeqCst) == 0 {
            return;
        }
        let mut rung = self.rung.lock().unwrap_or_else(PoisonError::into_inner);
        *rung = true;
        drop(rung);
        self.cv.notify_one();
    }

    /// Sleeps until rung or `timeout`, unless `has_work` says there is work already (checked
    /// after announcing the sleep, so work published meanwhile is never missed). Returns false
    /// when it timed out with nothing rung.
    pub fn wait(&self, timeout: Duration, has_work: impl Fn() -> bool) -> bool {
        let mut rung = self.rung.lock().unwrap_or_else(PoisonError::into_inner);
        self.sleepers.fetch_add(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        let woken = if *rung || has_work() {
            true
        } else {
            let (g, t) = self
                .cv
                .wait_timeout_while(rung, timeout, |r| !*r)
                .unwrap_or_else(PoisonError::into_inner);
            rung = g;
            !t.timed_out()
        };
        *rung = false;
        self.sleepers.fetch_sub(1, Ordering::SeqCst);
        woken
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crossbeam_queue::ArrayQueue;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    /// A producer hands items one at a time to a consumer that sleeps between them with a long
    /// timeout: a lost wake-up shows as a timed-out wait while an item was pending.
    #[test]
    fn no_lost_wake_ups() {
        let q = Arc::new(ArrayQueue::<u32>::new(4));
        let bell = Arc::new(Doorbell::new());
        let done = Arc::new(AtomicBool::new(false));
        let consumer = {
            let (q, bell, done) = (q.clone(), bell.clone(), done.clone());
            std::thread::spawn(move || {
                let (mut got, mut lost) = (0u32, 0u32);
                while !(done.load(Ordering::Acquire) && q.is_empty()) {
                    if q.pop().is_some() {
                        got += 1;
                        continue;
                    }
                    let pending_before = !q.is_empty();
                    if !bell.wait(Duration::from_secs(2), || !q.is_empty())
                        && !done.load(Ordering::Acquire)
                    {
                        // Timed out: only a lost wake-up if an item was waiting all along.
                        if pending_before || !q.is_empty() {
                            lost += 1;
                        }
                    }
                }
                (got, lost)
            })
        };
        for i in 0..20_000u32 {
            while q.push(i).is_err() {
                std::thread::yield_now();
            }
            bell.ring();
            if i % 64 == 0 {
                std::thread::sleep(Duration::from_micros(50)); // let the consumer fall asleep
            }
        }
        done.store(true, Ordering::Release);
        bell.ring();
        let (got, lost) = consumer.join().unwrap();
        assert_eq!(got, 20_000);
        assert_eq!(lost, 0);
    }

    #[test]
    fn wait_times_out_when_nobody_rings() {
        let bell = Doorbell::new();
        assert!(!bell.wait(Duration::from_millis(10), || false));
        bell.ring(); // nobody sleeping: remembered nowhere, costs nothing
        assert!(!bell.wait(Duration::from_millis(10), || false));
        assert!(bell.wait(Duration::from_millis(10), || true));
    }
}
