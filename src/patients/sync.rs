//! The atomics patients/ uses: std's, or loom's under `cfg(dicomgate_loom)` so the loom models
//! in `loom_models.rs` explore the same code (crossbeam-epoch's own `mod primitive` pattern).
//! Likewise the batch snapshot's [`ArcSwap`]: arc-swap's, or under loom a stand-in loom can see.

#[cfg(dicomgate_loom)]
pub(crate) use loom::sync::atomic::{
    AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};
#[cfg(not(dicomgate_loom))]
pub(crate) use std::sync::atomic::{
    AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};

#[cfg(not(dicomgate_loom))]
pub(crate) use arc_swap::ArcSwap;

/// Under loom: the part of arc-swap's `ArcSwap` the map uses, built on a loom mutex, so that
/// loom schedules around every load and publication of a snapshot (arc-swap's own atomics are
/// std's, invisible to loom: a model through them never interleaves a publication). `rcu` is
/// what arc-swap documents: load, compute, compare-and-swap, retry if another publication came
/// between; a loom preemption point lies between the load and the swap, so a lost update (a
/// plain load-then-store) is an interleaving loom finds. arc-swap's internal lock-free
/// protocol is arc-swap's to model (it has its own loom tests); this models the map's use of it.
#[cfg(dicomgate_loom)]
pub(crate) struct ArcSwap<T> {
    cur: loom::sync::Mutex<std::sync::Arc<T>>,
}

#[cfg(dicomgate_loom)]
impl<T> ArcSwap<T> {
    pub(crate) fn from_pointee(v: T) -> Self {
        ArcSwap {
            cur: loom::sync::Mutex::new(std::sync::Arc::new(v)),
        }
    }

    fn lock(&self) -> loom::sync::MutexGuard<'_, std::sync::Arc<T>> {
        self.cur.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn load_full(&self) -> std::sync::Arc<T> {
        self.lock().clone()
    }

    #[allow(dead_code)] // the mutation that loses an update uses it (loom_models.rs)
    pub(crate) fn store(&self, v: std::sync::Arc<T>) {
        *self.lock() = v;
    }

    pub(crate) fn rcu<R, F>(&self, mut f: F) -> std::sync::Arc<T>
    where
        F: FnMut(&std::sync::Arc<T>) -> R,
        R: Into<std::sync::Arc<T>>,
    {
        loop {
            let seen = self.load_full();
            let new = f(&seen).into();
            let mut cur = self.lock();
            if std::sync::Arc::ptr_eq(&cur, &seen) {
                return std::mem::replace(&mut *cur, new);
            }
        }
    }
}
