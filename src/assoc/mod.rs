//! Associations (PS3.8 §9.2): the Table 9-10 state machine for both sides, ARTIM and the node's
//! idle/DIMSE timers, and acceptor-side negotiation.
//!
//! Owns: association state and what is agreed in A-ASSOCIATE. Pure: no sockets, no clocks (time
//! is passed in as `Instant`), no unsafe. Must never block, and never act on a PDU the table does
//! not allow in the current state. What the standard defines (transfer syntaxes, SOP classes,
//! our implementation identity) comes from [`crate::dicom`].
//!
//! The `impl Config` blocks here (`acceptor_policy`, `resolve_peers`, `timeouts`,
//! `user_directory`) build this module's types from the configuration, which imports none of
//! them. Two of them have the configuration do I/O (`Config::peer_addresses` resolves the
//! `[[peer]]` hosts, `Config::users_file` reads the users file): the node calls them once at
//! start-up, never during negotiation.
#![forbid(unsafe_code)]

pub mod identity;
pub mod machine;
pub mod negotiation;

pub use machine::{Association, Event, NotAllowed, Received, State, Timeouts};
pub use negotiation::{
    negotiate_from, AcceptedContext, AcceptorPolicy, KnownPeers, Negotiated, Outcome, Slots,
};
