//! The node's one typed configuration (TOML). Every limit is a named field with its default and
//! the reason for it; README.md's "Configuration" and "Security and limits" sections list them.
//! Unknown fields are refused, so a typo is an error at start-up, not a silently ignored setting.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::assoc::transfer_syntax::{self, EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN};
use crate::assoc::{AcceptorPolicy, Timeouts};
use crate::storage::Durability;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub node: NodeConfig,
    pub limits: Limits,
    pub storage: StorageConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Our AE title; the called AE title of every association must equal it.
    pub ae_title: String,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Accept any called AE title instead of only `ae_title`.
    pub accept_any_called_ae: bool,
    /// Calling AE titles allowed to associate; empty means any.
    pub calling_ae_titles: Vec<String>,
    /// Reactor threads (one mio event loop each, pinned to a core); 0 = one per core.
    pub reactors: usize,
    /// Transfer syntax UIDs in order of preference when a context proposes several; proposed
    /// syntaxes not listed follow in the requestor's order.
    pub transfer_syntax_preference: Vec<String>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            ae_title: "DICOMGATE".into(),
            listen: SocketAddr::from(([0, 0, 0, 0], 11112)),
            data_dir: PathBuf::from("./dicomgate-data"),
            accept_any_called_ae: false,
            calling_ae_titles: Vec::new(),
            reactors: 0,
            transfer_syntax_preference: vec![
                EXPLICIT_VR_LITTLE_ENDIAN.into(),
                IMPLICIT_VR_LITTLE_ENDIAN.into(),
            ],
        }
    }
}

/// Bounds on what a peer controls (design rule 4).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest P-DATA-TF PDU we accept, advertised as our Maximum Length (PS3.8 D.1). 64 KiB:
    /// large enough that PDU overhead is negligible, small enough to bound each read buffer.
    pub max_pdu_length: u32,
    /// Largest A-ASSOCIATE-RQ we accept. 64 KiB holds 128 presentation contexts with ~10
    /// transfer syntaxes each.
    pub max_associate_length: u32,
    /// Presentation contexts per A-ASSOCIATE-RQ; PS3.8 allows at most 128 (odd IDs 1-255).
    pub max_presentation_contexts: usize,
    /// Largest data set in one C-STORE, buffered in memory before it is written. 2 GiB.
    pub max_message_bytes: usize,
    /// Concurrent associations on the node; more are rejected with A-ASSOCIATE-RJ 2/3/2
    /// (transient, local limit exceeded).
    pub max_associations: usize,
    /// Concurrent associations from one calling AE title; rejected with 2/3/2 beyond.
    pub max_associations_per_calling_ae: usize,
    /// Open TCP connections (associated or not); beyond it new connections are closed at once.
    pub max_connections: usize,
    /// Outstanding C-STORE operations one association may have on us (asynchronous operations
    /// window, PS3.7 D.3.3.3); used only when the requestor proposes a window.
    pub max_operations_performed: u16,
    /// ARTIM (PS3.8 §9.1.5): time to receive an A-ASSOCIATE-RQ after connecting, and to see the
    /// transport close after a release or abort.
    pub artim_seconds: u64,
    /// An established association that sends no PDU for this long is aborted. 0 = never.
    pub idle_seconds: u64,
    /// A message stalled half-way for this long is aborted. 0 = never.
    pub dimse_seconds: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_pdu_length: 65_536,
            max_associate_length: 65_536,
            max_presentation_contexts: 128,
            max_message_bytes: 2 << 30,
            max_associations: 256,
            max_associations_per_calling_ae: 64,
            max_connections: 2048,
            max_operations_performed: 16,
            artim_seconds: 30,
            idle_seconds: 300,
            dimse_seconds: 60,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Threads writing and flushing instances (each commits its own batches).
    pub workers: usize,
    /// Store jobs queued between reactors and workers; when full, reactors stop reading.
    pub queue_depth: usize,
    /// `fsync`, `syncfs` or `none` (benchmarks only: acknowledged data can be lost).
    pub durability: Durability,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            workers: 2,
            queue_depth: 1024,
            durability: Durability::Fsync,
        }
    }
}

/// A configuration that cannot be used.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

fn valid_ae(ae: &str) -> bool {
    let t = ae.trim();
    !t.is_empty() && t.len() <= 16 && t.bytes().all(|b| (0x20..0x7F).contains(&b) && b != b'\\')
}

impl Config {
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let c: Config = toml::from_str(text).map_err(|e| ConfigError(e.to_string()))?;
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |s: String| Err(ConfigError(s));
        if !valid_ae(&self.node.ae_title) {
            return err(format!(
                "node.ae_title {:?} is not a valid AE title (1-16 chars)",
                self.node.ae_title
            ));
        }
        if let Some(bad) = self.node.calling_ae_titles.iter().find(|a| !valid_ae(a)) {
            return err(format!(
                "node.calling_ae_titles: {bad:?} is not a valid AE title"
            ));
        }
        for uid in &self.node.transfer_syntax_preference {
            if transfer_syntax::by_uid(uid.as_bytes()).is_none() {
                return err(format!(
                    "node.transfer_syntax_preference: unknown transfer syntax {uid}"
                ));
            }
        }
        let l = &self.limits;
        if l.max_pdu_length < 4096 {
            return err("limits.max_pdu_length must be at least 4096".into());
        }
        if l.max_associate_length < 1024 {
            return err("limits.max_associate_length must be at least 1024".into());
        }
        if l.max_presentation_contexts == 0 || l.max_presentation_contexts > 128 {
            return err("limits.max_presentation_contexts must be 1..=128".into());
        }
        if l.max_associations == 0
            || l.max_associations_per_calling_ae == 0
            || l.max_connections == 0
        {
            return err("association and connection limits must be at least 1".into());
        }
        if l.artim_seconds == 0 {
            return err("limits.artim_seconds must be at least 1".into());
        }
        if self.storage.workers == 0 || self.storage.queue_depth == 0 {
            return err("storage.workers and storage.queue_depth must be at least 1".into());
        }
        Ok(())
    }

    pub fn timeouts(&self) -> Timeouts {
        let opt = |s: u64| (s > 0).then(|| Duration::from_secs(s));
        Timeouts {
            artim: Duration::from_secs(self.limits.artim_seconds),
            idle: opt(self.limits.idle_seconds),
            dimse: opt(self.limits.dimse_seconds),
        }
    }

    pub fn acceptor_policy(&self) -> AcceptorPolicy {
        AcceptorPolicy {
            ae_title: self.node.ae_title.trim().to_string(),
            accept_any_called_ae: self.node.accept_any_called_ae,
            calling_ae_allow: (!self.node.calling_ae_titles.is_empty()).then(|| {
                self.node
                    .calling_ae_titles
                    .iter()
                    .map(|a| a.trim().to_string())
                    .collect()
            }),
            max_pdu_length: self.limits.max_pdu_length,
            max_operations_performed: self.limits.max_operations_performed.max(1),
            transfer_syntax_preference: self
                .node
                .transfer_syntax_preference
                .iter()
                .filter_map(|u| transfer_syntax::by_uid(u.as_bytes()))
                .collect(),
            max_presentation_contexts: self.limits.max_presentation_contexts,
        }
    }

    pub fn reactor_count(&self) -> usize {
        if self.node.reactors > 0 {
            self.node.reactors
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_embedded() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.node.ae_title, "DICOMGATE");
        assert_eq!(c.node.listen.port(), 11112);
        assert_eq!(c.storage.durability, Durability::Fsync);
    }

    #[test]
    fn node_section_uses_issue_names_and_refuses_typos() {
        let c = Config::from_toml(
            "[node]\nae_title = \"GATE\"\nlisten = \"127.0.0.1:11112\"\ndata_dir = \"/var/lib/dicomgate\"\n",
        )
        .unwrap();
        assert_eq!(c.node.ae_title, "GATE");
        assert!(Config::from_toml("[node]\nae_titel = \"X\"\n").is_err());
        assert!(Config::from_toml("[node]\nae_title = \"WAY_TOO_LONG_AE_TITLE\"\n").is_err());
        assert!(Config::from_toml("[storage]\ndurability = \"sometimes\"\n").is_err());
    }
}
