//! Another node's folder, read for a takeover (issue 15 item 2): what a dead node holds
//! pending, described as that node's own restart would publish it.
//!
//! Owns: [`ForeignReader`], the pipeline's side of `cluster::outbox::Foreign`. Must never write
//! to the folder it reads (its node may be alive after all, paused past its lease): it reads
//! through `storage::inventory` and `storage::log::read_record`, which only read, and only whole,
//! checksummed log records.

use std::path::Path;
use std::sync::Arc;

use crate::cluster::outbox::{Described, Foreign};
use crate::config::NodeConfig;
use crate::storage::inventory::{self, Entry, Source};

use super::Pipeline;

/// Describes another node's instances with this node's rules (every node of a cluster runs
/// the same configuration).
#[derive(Debug)]
pub struct ForeignReader {
    pub pipeline: Arc<Pipeline>,
    pub node: NodeConfig,
    /// This node's own folder and running log ([`Foreign::own_holds`]).
    pub own_dir: std::path::PathBuf,
    pub own_log: Arc<crate::storage::log::Log>,
}

/// An instance listed and no longer there: gone, if its node's folder still is (else the
/// folder was unmounted or moved since the listing, which must not pass for "all gone").
fn gone(node_dir: &Path) -> std::io::Result<Described> {
    if node_dir.join("log").is_dir() {
        Ok(Described::Gone)
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!(
                "{} is no longer a node's folder (no log/)",
                node_dir.display()
            ),
        ))
    }
}

impl Foreign for ForeignReader {
    fn pending(&self, node_dir: &Path) -> std::io::Result<Vec<Entry>> {
        // Every node's folder has its log (made at its first start): without it this is not a
        // node's folder (the shared folder not mounted, the node's folder removed), which must
        // not pass for a node with nothing pending.
        let log = node_dir.join("log");
        if !log.is_dir() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{} is not a node's folder (no log/)", node_dir.display()),
            ));
        }
        let held = super::held_records(node_dir)?;
        Ok(inventory::pending_except(node_dir, &held)?.0)
    }

    fn own_holds(&self, location: &str) -> std::io::Result<bool> {
        let rel = inventory::rel_of(location).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("location {location:?} is not under patients/"),
            )
        })?;
        if self.own_log.holds(rel) {
            return Ok(true);
        }
        match std::fs::symlink_metadata(self.own_dir.join("patients").join(rel)) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn describe(
        &self,
        node_id: &str,
        node_dir: &Path,
        entry: &Entry,
    ) -> std::io::Result<Described> {
        let described = match &entry.source {
            Source::File(f) => {
                let bytes = match std::fs::read(f) {
                    Ok(b) => b,
                    // Processed and removed by its node since the listing (it is alive after
                    // all): nothing pending there any more.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return gone(node_dir),
                    Err(e) => return Err(e),
                };
                super::describe_part10(&self.pipeline, &self.node, &bytes)
                    .map(|(key, record)| (key, record, crate::storage::modified_ms(f)))
            }
            Source::Log(loc) => {
                // Its segment freed (every record released, or recycled as the spare) since
                // the listing: nothing pending there any more. (A recycled segment read at an
                // old offset fails its checksum: an error, and the listing is given up.)
                let inst = match crate::storage::log::read_record(&node_dir.join("log"), *loc) {
                    Ok(i) => i,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return gone(node_dir),
                    Err(e) => return Err(e),
                };
                super::describe_log_record(&self.pipeline, &self.node, &inst)
                    .map(|(key, record)| (key, record, inst.meta.received_ms))
            }
        };
        let Some((key, record, received_ms)) = described else {
            return Ok(Described::Unparsed);
        };
        // As the node itself names it (`Pipeline::publish`): its path under the node's folder.
        let location = inventory::location_of(&entry.rel);
        Ok(Described::Record(super::published(
            node_id,
            &key,
            &record,
            location,
            received_ms,
        )))
    }
}
