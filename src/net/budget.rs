//! The node-wide budget for data set bytes held in memory (`[limits] max_buffered_bytes`):
//! messages being assembled plus stores waiting for or handed to storage, summed over every
//! association of every reactor. A connection is not read from while the node is over budget
//! (backpressure: its peer's TCP window fills), so memory no longer grows with the number of
//! associations; a store is never failed for it.
//!
//! Progress: when the node is over budget and every connection waits, the bytes held by stores
//! come back as storage answers them, but a message half received would never finish. So once
//! no store holds bytes any more (all that is held is in messages half received), one
//! connection at a time, one in the middle of a message, may read past the budget (the
//! overdraft) until that message is complete. The peak is the budget plus one message.
//!
//! Owns only counters. Lost wake-ups are excluded as in the doorbell: a connection that finds
//! the node over budget sets its reactor's bit in `starved`, fences, then looks at `used` again;
//! whoever lowers `used` fences and then reads `starved`.

use std::sync::atomic::{fence, AtomicU64, AtomicUsize, Ordering};

#[derive(Debug)]
pub struct Budget {
    limit: usize,
    used: AtomicUsize,
    /// The part of `used` held by stores (waiting for storage or in it), not by messages.
    queued: AtomicUsize,
    /// The connection allowed past the limit: 0 = none, else its key (see [`Budget::key`]).
    overdraft: AtomicU64,
    /// Bit `r % 64`: reactor `r` has connections waiting for room.
    starved: AtomicU64,
}

impl Budget {
    pub fn new(limit: usize) -> Budget {
        Budget {
            limit,
            used: AtomicUsize::new(0),
            queued: AtomicUsize::new(0),
            overdraft: AtomicU64::new(0),
            starved: AtomicU64::new(0),
        }
    }

    /// A connection's key: never 0 (generations start at 1).
    pub fn key(reactor: usize, generation: u64) -> u64 {
        ((reactor as u64 & 0xFFFF) << 48) | (generation & ((1 << 48) - 1)) | (1 << 63)
    }

    /// Bytes held by the whole node.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// A connection's holding went from `old` to `new` bytes, of which its stores hold
    /// `old_queued` then `new_queued`; true when that freed room.
    pub fn adjust(
        &self,
        (old, old_queued): (usize, usize),
        (new, new_queued): (usize, usize),
    ) -> bool {
        if new_queued > old_queued {
            self.queued
                .fetch_add(new_queued - old_queued, Ordering::SeqCst);
        } else if old_queued > new_queued {
            self.queued
                .fetch_sub(old_queued - new_queued, Ordering::SeqCst);
        }
        if new > old {
            self.used.fetch_add(new - old, Ordering::SeqCst);
            false
        } else if old > new {
            self.used.fetch_sub(old - new, Ordering::SeqCst);
            true
        } else {
            false
        }
    }

    /// Whether the connection `key` may read now. `in_progress`: it is in the middle of a
    /// message, so it may take the overdraft when nobody holds it.
    pub fn may_read(&self, key: u64, in_progress: bool) -> bool {
        if self.used.load(Ordering::SeqCst) < self.limit {
            return true;
        }
        let holder = self.overdraft.load(Ordering::SeqCst);
        holder == key
            || (holder == 0
                && in_progress
                && self.queued.load(Ordering::SeqCst) == 0
                && self
                    .overdraft
                    .compare_exchange(0, key, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok())
    }

    /// After `may_read` said no: asks to be woken (reactor `reactor`'s bit) when room is made,
    /// then asks `may_read` once more (room, or an overdraft that became free, meanwhile);
    /// true when the connection may read after all.
    pub fn starve(&self, reactor: usize, key: u64, in_progress: bool) -> bool {
        self.starved.fetch_or(1 << (reactor % 64), Ordering::SeqCst);
        fence(Ordering::SeqCst);
        self.may_read(key, in_progress)
    }

    /// The connection `key` gives the overdraft back (its message is complete, or it ended);
    /// true when it held it.
    pub fn release_overdraft(&self, key: u64) -> bool {
        self.overdraft
            .compare_exchange(key, 0, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    /// After room was made: the bits of the reactors to wake.
    pub fn take_starved(&self) -> u64 {
        fence(Ordering::SeqCst);
        if self.starved.load(Ordering::SeqCst) == 0 {
            return 0;
        }
        self.starved.swap(0, Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn over_budget_only_one_connection_in_a_message_may_read() {
        let b = Budget::new(100);
        let (k1, k2) = (Budget::key(0, 1), Budget::key(1, 1));
        assert!(b.may_read(k1, false));
        b.adjust((0, 0), (150, 40));
        assert!(
            !b.may_read(k1, true),
            "stores hold bytes: wait for storage, no overdraft"
        );
        b.adjust((150, 40), (110, 0));
        assert!(!b.may_read(k1, false), "not in a message: waits");
        assert!(b.may_read(k1, true), "takes the overdraft");
        assert!(!b.may_read(k2, true), "one holder at a time");
        assert!(!b.starve(1, k2, true));
        assert!(b.release_overdraft(k1));
        assert!(b.may_read(k2, true));
        assert!(b.adjust((110, 0), (20, 0)));
        assert_eq!(b.take_starved(), 1 << 1);
        assert_eq!(b.take_starved(), 0);
        assert!(b.may_read(k1, false));
    }
}
