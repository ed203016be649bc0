//! What patients/ shares between threads: std's atomics, or loom's under `cfg(dicomgate_loom)` so
//! the loom models in `loom_models.rs` explore the same code (crossbeam-epoch's own
//! `mod primitive` pattern). Likewise the batch summary's [`ArcSwap`] (arc-swap's, or under loom
//! a stand-in loom can see) and the [`UnsafeCell`] that holds each pushed record (std's, or
//! loom's, which reports a read of a record that is not ordered with the claimer's taking it).

#[cfg(dicomgate_loom)]
pub(crate) use loom::sync::atomic::{
    fence, AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};
#[cfg(not(dicomgate_loom))]
pub(crate) use std::sync::atomic::{
    fence, AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};

#[cfg(not(dicomgate_loom))]
pub(crate) use arc_swap::ArcSwap;

#[cfg(dicomgate_loom)]
pub(crate) use loom::cell::UnsafeCell;

/// std's `UnsafeCell` with loom's interface: `with` for a shared access, `with_mut` for an
/// exclusive one (under loom each is checked against the others' happens-before order).
#[cfg(not(dicomgate_loom))]
#[derive(Debug)]
pub(crate) struct UnsafeCell<T>(std::cell::UnsafeCell<T>);

#[cfg(not(dicomgate_loom))]
impl<T> UnsafeCell<T> {
    pub(crate) fn new(v: T) -> Self {
        UnsafeCell(std::cell::UnsafeCell::new(v))
    }

    pub(crate) fn with<R>(&self, f: impl FnOnce(*const T) -> R) -> R {
        f(self.0.get())
    }

    pub(crate) fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
        f(self.0.get())
    }

    pub(crate) fn into_inner(self) -> T {
        self.0.into_inner()
    }
}

/// Under loom: the part of arc-swap's `ArcSwap` the map uses, built on a loom mutex, so that
/// loom schedules around every load and publication of a batch summary (arc-swap's own atomics
/// are std's, invisible to loom: a model through them never interleaves a publication).
/// `compare_and_swap` is what arc-swap documents: the new value is stored only if the current
/// one is (by pointer) the one given; a loom preemption point lies between a reader's load and
/// its compare-and-swap, so a reader that overwrote a newer summary with an older one would be
/// an interleaving loom finds. arc-swap's internal lock-free protocol is arc-swap's to model
/// (it has its own loom tests); this models the map's use of it.
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

    /// Stores `new` if the current value is `current`; returns the value found (arc-swap
    /// returns it in a guard).
    pub(crate) fn compare_and_swap(
        &self,
        current: &std::sync::Arc<T>,
        new: std::sync::Arc<T>,
    ) -> std::sync::Arc<T> {
        let mut cur = self.lock();
        if std::sync::Arc::ptr_eq(&cur, current) {
            std::mem::replace(&mut *cur, new)
        } else {
            cur.clone()
        }
    }
}
