//! # dicomgate
//!
//! A DICOM ingestion gateway node. Modalities, PACS and other nodes send it images over the DICOM
//! network protocol; it stores each instance durably and byte-exact, and (from issue 3 on) groups
//! them per patient, decides when a patient has sufficient data, processes and exports the batch.
//!
//! The map, in the order one instance travels:
//!
//! - [`net`] — the only socket code on the data path: an acceptor hands connections to one mio
//!   reactor per pinned core; each reactor reads into a reused buffer per connection and moves
//!   bytes and completions between the socket, the association's DIMSE service and storage;
//!   and the blocking requestor (`net::scu`) that exports, prior-study retrievals and
//!   `dicomgate echo` / `store` use.
//! - [`handoff`] — what a reactor hands ingest (a durable instance, an ended association) on
//!   its bounded lock-free queue, and the one question it asks the rules ([`handoff::Door`]).
//!   `net` and `pipeline` meet only here.
//! - [`dicom`] — what the standard defines and several layers share, one definition of each:
//!   transfer syntaxes, SOP classes, tags and the dictionary by keyword, the UID rule, the VR
//!   table, the element writer, the bounded routing scan of a data set's top level, the Part-10
//!   meta group, our implementation identity. Pure; it imports no other module.
//! - [`ul`] — the Upper Layer wire format (PS3.8 §9): a deframer answers Complete / Partial /
//!   Error from the 6-byte header, PDUs are parsed as views into the buffer. Pure.
//! - [`assoc`] — the PS3.8 Table 9-10 state machine for both sides, ARTIM and idle timers (time
//!   passed in), and acceptor negotiation. Pure.
//! - [`dimse`] — command sets, message assembly from PDV fragments, C-ECHO and C-STORE logic
//!   (routing values from `dicom::scan`), and `dimse::service`: one association's DIMSE state
//!   (window, stores waiting for storage, release gating), sans-IO.
//! - [`storage`] — the segment log for small instances (append, one shared fdatasync per
//!   group-commit round, recovery; `docs/segment-log.md`) and Part-10 files for large ones
//!   (temp-write, flush, link, directory flush). Only after that does the reactor send the
//!   C-STORE success.
//! - [`patients`] — the concurrent patient map (crossbeam-epoch, arc-swap snapshots): the only
//!   shared mutable state and the only unsafe code.
//! - [`pipeline`] — ingest, triggers, sufficiency rules, the exactly-once claim, processing
//!   (command or Rust trait), export (C-STORE or folder), the retry outbox, expiry and restart
//!   recovery.
//! - [`http`] — the HTTP endpoint, one pool of threads off the reactors: `/metrics`, health,
//!   the status page and `/api/status` (`http::status`), and the operator's `POST /api/retry`
//!   and `/api/force`.
//! - [`node`] — start-up (wiring storage, the pipeline, the reactors and the endpoint) and the
//!   handle that drains and stops a running node.
//! - [`cluster`] — scale-out coordination on PostgreSQL (issue 15: leases, partitions under
//!   fencing tokens, publication, claims as transactions), used by the node with `[cluster]`
//!   (its outbox, and the owner side in `pipeline`).
//! - [`config`] — one typed TOML config, plain data; every limit is a named field with a
//!   default.
//! - [`bench`] — the C-STORE load generator behind `dicomgate bench` and `dicomgate-loadgen`,
//!   its synthetic CT instances and its HTML report.
//!
//! Test scaffolding is not part of this API: the fuzz target bodies (`fuzzing`, which the unit
//! tests, the integration tests and `fuzz/` call) are built only with the internal cargo
//! feature `__fuzzing` (see Cargo.toml), as rustls and quinn keep theirs out of their public
//! API.
//!
//! Unsafe code is denied crate-wide except in `patients`; `dicom`, `ul`, `assoc` and `dimse`
//! forbid it.

#[cfg(not(dicomgate_loom))]
pub mod assoc;
#[cfg(not(dicomgate_loom))]
pub mod bench;
#[cfg(not(dicomgate_loom))]
pub mod cluster;
#[cfg(not(dicomgate_loom))]
pub mod config;
#[cfg(not(dicomgate_loom))]
pub mod dicom;
#[cfg(not(dicomgate_loom))]
pub mod dimse;
#[cfg(not(dicomgate_loom))]
pub mod doorbell;
#[cfg(all(not(dicomgate_loom), any(test, feature = "__fuzzing")))]
#[doc(hidden)]
pub mod fuzzing;
#[cfg(not(dicomgate_loom))]
pub mod handoff;
#[cfg(not(dicomgate_loom))]
pub mod http;
#[cfg(not(dicomgate_loom))]
pub mod net;
#[cfg(not(dicomgate_loom))]
pub mod node;
pub mod patients;
#[cfg(not(dicomgate_loom))]
pub mod pipeline;
#[cfg(not(dicomgate_loom))]
pub mod storage;
#[cfg(not(dicomgate_loom))]
pub mod ul;
pub mod wakeflag;
