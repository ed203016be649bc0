//! 1,000 connections that stall after a few bytes (ARTIM closes them) and 1,000 idle established
//! associations (the idle timeout aborts them) while a normal sender keeps being served; the
//! node's memory per idle association is measured and printed (issue 4).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use dicomgate::net::scu::Client;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

const N: usize = 1000;

/// Waits until the node closes `s` (EOF or reset), reading and discarding what it sends; gives up
/// at `deadline` (a bound on the wait, not a claim about speed).
fn closed_by_node(s: &mut TcpStream, deadline: Instant) -> bool {
    let mut buf = [0u8; 256];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        s.set_read_timeout(Some(left.min(Duration::from_secs(1))))
            .unwrap();
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return true,
        }
    }
}

#[test]
fn stalled_connections_and_idle_associations_are_closed_while_a_sender_is_served() {
    let mut node = Node::start(
        "[limits]\nartim_seconds = 3\nidle_seconds = 4\nmax_associations = 2000\nmax_associations_per_calling_ae = 2000\nmax_associations_per_address = 2000\nmax_connections = 4096\n",
    );
    let rss_start = node.rss_kib();
    // Idle associations first (each negotiated, then silent).
    let opts = scu_options("IDLE");
    let proposal = ct_proposal_in(EXPLICIT_LE);
    let mut idle: Vec<Client> = (0..N)
        .map(|_| Client::connect(node.addr, &opts, std::slice::from_ref(&proposal)).unwrap())
        .collect();
    let rss_idle = node.rss_kib();
    // Then connections that send three bytes of a PDU header and stall.
    let mut stalled: Vec<TcpStream> = (0..N)
        .map(|_| {
            let mut s = TcpStream::connect(node.addr).unwrap();
            s.write_all(&[0x01, 0x00, 0x00]).unwrap();
            s
        })
        .collect();
    let per_assoc = (rss_idle.saturating_sub(rss_start)) as f64 / N as f64;
    eprintln!(
        "node RSS: {rss_start} KiB at start, {rss_idle} KiB with {N} idle associations: {per_assoc:.1} KiB each"
    );
    // A normal sender is served meanwhile.
    storescu_still_stores(&node);
    assert_eq!(node.stored().len(), 1);
    // Everything hostile is closed by the node, well before a generous bound.
    let deadline = Instant::now() + Duration::from_secs(60);
    for s in &mut stalled {
        assert!(
            closed_by_node(s, deadline),
            "a stalled connection was not closed"
        );
    }
    for c in &mut idle {
        assert!(
            closed_by_node(c.stream(), deadline),
            "an idle association was not closed"
        );
    }
    assert!(node.is_running());
    let log = node.log();
    assert!(
        log.matches("idle timeout").count() >= N,
        "idle aborts not logged"
    );
    // Connections are released: a new association is accepted.
    let mut c = Client::connect(node.addr, &opts, &[proposal]).unwrap();
    let ds = dataset("AFTER", "1.2.77", "1.2.77.1", "1.2.77.1.1", 16);
    assert_eq!(
        c.store(CT_IMAGE_STORAGE, "1.2.77.1.1", EXPLICIT_LE, &ds)
            .unwrap()
            .0,
        0
    );
    c.release().unwrap();
}
