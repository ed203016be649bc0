//! The coalescing wake-up flag of a reactor's mailbox: producers (storage workers, the acceptor,
//! ingest) publish an item on a lock-free queue and then [`WakeFlag::notify`]; only the first
//! notify after the reactor began its last drain pays for a real wake-up (a `mio::Waker`
//! write). The reactor calls [`WakeFlag::begin_drain`] before it empties its queues.
//!
//! Owns only the flag. The ordering argument: `begin_drain` is a read-modify-write. A notify
//! that finds the flag set (and so wakes nobody) wrote `true` with release order; the drain's
//! swap reads that `true` (a read-modify-write reads the latest value) with acquire order, so
//! the item published before the notify is visible to every pop after the drain began. A plain
//! `store(false)` has no read half: on x86 the queue loads after it may run before it leaves the
//! store buffer, and an item pushed in that gap was found by nobody until some unrelated event
//! woke the reactor (up to the 300 s idle timer). The loom model
//! `wake_flag_loses_no_item` checks both halves; it finds the lost item with a plain store.
#![forbid(unsafe_code)]

#[cfg(dicomgate_loom)]
use loom::sync::atomic::{AtomicBool, Ordering};
#[cfg(not(dicomgate_loom))]
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Debug, Default)]
pub struct WakeFlag {
    pending: AtomicBool,
}

impl WakeFlag {
    pub fn new() -> WakeFlag {
        WakeFlag::default()
    }

    /// After publishing an item: true when the caller must wake the consumer (no wake-up is
    /// pending since its last `begin_drain`).
    pub fn notify(&self) -> bool {
        !self.pending.swap(true, Ordering::AcqRel)
    }

    /// The consumer, before it empties its queues: from here on a new item needs a new wake.
    pub fn begin_drain(&self) {
        self.pending.swap(false, Ordering::AcqRel);
    }
}

#[cfg(all(test, dicomgate_loom))]
mod loom_models {
    use super::WakeFlag;
    use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use loom::sync::Arc;
    use loom::thread;

    /// A wake-up is pending (the reactor is about to drain) when a producer publishes one more
    /// item. Either the drain that follows sees the item, or the producer's notify asks for a
    /// new wake-up: never neither.
    #[test]
    fn wake_flag_loses_no_item() {
        loom::model(|| {
            let flag = Arc::new(WakeFlag::new());
            assert!(flag.notify()); // the earlier item's wake-up, now being handled
            let items = Arc::new(AtomicUsize::new(0));
            let woke = Arc::new(AtomicBool::new(false));
            let producer = {
                let (flag, items, woke) = (flag.clone(), items.clone(), woke.clone());
                thread::spawn(move || {
                    items.fetch_add(1, Ordering::Release); // the queue's push
                    if flag.notify() {
                        woke.store(true, Ordering::Release);
                    }
                })
            };
            flag.begin_drain();
            let seen = items.load(Ordering::Acquire); // the queue's pop
            producer.join().unwrap();
            assert!(
                seen == 1 || woke.load(Ordering::Acquire),
                "an item was published, the drain did not see it and nobody was woken"
            );
        });
    }
}
