//! The atomics patients/ uses: std's, or loom's under `cfg(dicomgate_loom)` so the loom models
//! in `loom_models.rs` explore the same code (crossbeam-epoch's own `mod primitive` pattern).

#[cfg(dicomgate_loom)]
pub(crate) use loom::sync::atomic::{
    AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};
#[cfg(not(dicomgate_loom))]
pub(crate) use std::sync::atomic::{
    AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};
