//! Fuzz target bodies, kept in the library so they compile with every build and are called from
//! unit tests; `fuzz/fuzz_targets/*.rs` are a few lines each. A panic here is the fuzzer's oracle,
//! so these bodies assert.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use crate::ul::{self, Status};

/// Largest PDU the body lets the deframer accept: the node's default limit.
const MAX_PDU: u32 = 65_536;

/// Deframes a byte stream into PDUs and decodes each. Decoding must never panic; whatever decodes
/// must re-encode to bytes that decode to the same PDU and re-encode identically (for canonical
/// input the re-encoding equals the input; see `tests/pdu_vectors.rs`).
pub fn pdu_decode(data: &[u8]) {
    let mut rest = data;
    while let Ok(Status::Complete(n)) = ul::deframe(rest, MAX_PDU) {
        let (one, tail) = rest.split_at(n);
        if let Ok(pdu) = ul::decode(one) {
            let mut out = Vec::new();
            if pdu.encode(&mut out).is_ok() {
                let again = ul::decode(&out).expect("a re-encoded PDU decodes");
                assert_eq!(pdu, again, "decode(encode(pdu)) != pdu");
                let mut out2 = Vec::new();
                again.encode(&mut out2).expect("encodes twice");
                assert_eq!(out, out2, "encoding is not stable");
                if let ul::Pdu::PDataTf(p) = &pdu {
                    let total: usize = p.pdvs().map(|v| v.data.len() + 6).sum();
                    assert_eq!(total, p.body().len(), "PDV iteration lost bytes");
                }
            }
        }
        rest = tail;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every captured vector, whole and in pieces, goes through the fuzz body.
    #[test]
    fn pdu_decode_body_runs_on_vectors_and_garbage() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors");
        let mut all = Vec::new();
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            if e.path().extension().is_some_and(|x| x == "bin") {
                let b = std::fs::read(e.path()).unwrap();
                pdu_decode(&b);
                for cut in [1, 6, 7, b.len() / 2] {
                    pdu_decode(&b[..cut.min(b.len())]);
                }
                all.extend_from_slice(&b);
            }
        }
        assert!(all.len() > 40_000);
        pdu_decode(&all);
        pdu_decode(&[0x04, 0, 0, 0, 0, 6, 0, 0, 0, 2, 1, 3]);
        pdu_decode(&[0x01, 0, 0xFF, 0xFF, 0xFF, 0xFF]);
    }
}
