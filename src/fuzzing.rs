//! Fuzz target bodies, kept in the library so they compile with every build and are called from
//! unit tests; `fuzz/fuzz_targets/*.rs` are a few lines each. A panic here is the fuzzer's oracle,
//! so these bodies assert.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use crate::ul::{self, Status};

/// Largest PDU the body lets the deframer accept: the node's default limit.
const MAX_PDU: u32 = 65_536;

/// `len` deterministic pseudo-random bytes (xorshift64, the low byte of each step) from
/// `state`, which advances: what the unit and integration tests feed the fuzz bodies and the
/// node in place of the fuzzer.
pub fn xorshift_bytes(state: &mut u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|_| {
            *state ^= *state << 13;
            *state ^= *state >> 7;
            *state ^= *state << 17;
            *state as u8
        })
        .collect()
}

/// Deframes a byte stream into PDUs and decodes each. Decoding must never panic; whatever decodes
/// must re-encode to exactly the bytes it was decoded from, reserved fields included (PS3.8
/// §9.3: sent as 00H, not tested when received: the decoder keeps them as they came), and that
/// re-encoding must decode to the same PDU.
pub fn pdu_decode(data: &[u8]) {
    let mut rest = data;
    while let Ok(Status::Complete(n)) = ul::deframe(rest, MAX_PDU) {
        let (one, tail) = rest.split_at(n);
        if let Ok(pdu) = ul::decode(one) {
            if let ul::Pdu::AssociateRq(rq) = &pdu {
                let _ = negotiate_at_the_door(rq);
            }
            let mut out = Vec::new();
            // Whatever decodes fits its length fields again, so it encodes.
            pdu.encode(&mut out).expect("a decoded PDU encodes");
            {
                assert_eq!(out, one, "encode(decode(bytes)) != bytes");
                let again = ul::decode(&out).expect("a re-encoded PDU decodes");
                assert_eq!(pdu, again, "decode(encode(pdu)) != pdu");
                if let ul::Pdu::PDataTf(p) = &pdu {
                    let total: usize = p.pdvs().map(|v| v.data.len() + 6).sum();
                    assert_eq!(total, p.body().len(), "PDV iteration lost bytes");
                }
            }
        }
        rest = tail;
    }
}

/// Negotiates a decoded A-ASSOCIATE-RQ under a policy with every door check on (a users file
/// of username-only users, known peers with their addresses, unknown SOP classes accepted):
/// never panics, and an accepted one's A-ASSOCIATE-AC decodes. Whether it was accepted.
fn negotiate_at_the_door(rq: &ul::Associate<'_>) -> bool {
    use crate::assoc::{identity::UserDirectory, negotiate_from, KnownPeers, Outcome};
    use std::sync::Arc;
    let mut policy = crate::config::Config::default().acceptor_policy();
    policy.accept_any_called_ae = true;
    policy.accept_unknown_sop_classes = true;
    policy.extra_sop_classes = vec!["1.3.12.2.1107.5.9.1".into()];
    policy.peers = Arc::new(KnownPeers {
        peers: vec![("SCU".into(), vec![std::net::IpAddr::from([127, 0, 0, 1])])],
        check_address: true,
        known_only: false,
    });
    policy.identity = UserDirectory::parse("u:-\nscanner:-\n", true, [0; 32])
        .ok()
        .map(Arc::new);
    match negotiate_from(
        rq,
        &policy,
        Some(std::net::IpAddr::from([127, 0, 0, 2])),
        std::time::Instant::now(),
        &true,
    ) {
        Outcome::Accept { ac, .. } => {
            ul::decode(&ac).expect("our A-ASSOCIATE-AC decodes");
            true
        }
        Outcome::Reject(..) => false,
    }
}

/// A cursor that turns fuzz bytes into choices; reads past the end give zeros.
struct Choices<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Choices<'a> {
    fn new(data: &'a [u8]) -> Self {
        Choices { data, pos: 0 }
    }
    fn done(&self) -> bool {
        self.pos >= self.data.len()
    }
    fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }
    fn bytes(&mut self, max: usize) -> &'a [u8] {
        let n = (self.u8() as usize).min(max);
        let start = self.pos.min(self.data.len());
        let end = (start + n).min(self.data.len());
        self.pos = start + n;
        &self.data[start..end]
    }
}

/// Builds a PDU from fuzz choices, encodes it, decodes the bytes: the decoded PDU must equal the
/// built one and re-encode to the same bytes (encode → decode → encode is byte-exact).
pub fn pdu_roundtrip(data: &[u8]) {
    use crate::ul::*;
    let mut c = Choices::new(data);
    let pdu = match c.u8() % 7 {
        0 | 1 => {
            let is_rq = c.u8().is_multiple_of(2);
            let mut items = vec![Item::ApplicationContext(c.bytes(64))];
            while !c.done() && items.len() < 40 {
                let item = match c.u8() % 4 {
                    0 if is_rq => Item::PresentationContextRq(PresentationContextRq {
                        field: &[],
                        id: c.u8(),
                        reserved: [c.u8(), c.u8(), c.u8()],
                        abstract_syntax: c.bytes(64),
                        transfer_syntaxes: (0..1 + c.u8() % 4).map(|_| c.bytes(64)).collect(),
                    }),
                    0 => Item::PresentationContextAc(PresentationContextAc {
                        id: c.u8(),
                        reserved: [0; 2],
                        result: PcResult(c.u8() % 5),
                        transfer_syntax: Some(c.bytes(64)),
                        not_significant: &[],
                    }),
                    1 => {
                        let mut subs = Vec::new();
                        for _ in 0..c.u8() % 6 {
                            subs.push(match c.u8() % 10 {
                                0 => SubItem::MaximumLength(u32::from_be_bytes([
                                    c.u8(),
                                    c.u8(),
                                    c.u8(),
                                    c.u8(),
                                ])),
                                1 => SubItem::ImplementationClassUid(c.bytes(64)),
                                2 => SubItem::AsynchronousOperationsWindow {
                                    max_invoked: u16::from(c.u8()),
                                    max_performed: u16::from(c.u8()),
                                },
                                3 => SubItem::RoleSelection {
                                    sop_class_uid: c.bytes(64),
                                    scu_role: c.u8(),
                                    scp_role: c.u8(),
                                },
                                4 => SubItem::ImplementationVersionName(c.bytes(16)),
                                5 => SubItem::SopClassExtended {
                                    sop_class_uid: c.bytes(64),
                                    info: c.bytes(32),
                                },
                                6 => SubItem::SopClassCommonExtended {
                                    sop_class_uid: c.bytes(64),
                                    service_class_uid: c.bytes(64),
                                    related_general_sop_classes: (0..c.u8() % 3)
                                        .map(|_| c.bytes(64))
                                        .collect(),
                                    reserved: c.bytes(8),
                                },
                                7 => SubItem::UserIdentityRq {
                                    identity_type: c.u8(),
                                    positive_response_requested: c.u8(),
                                    primary: c.bytes(64),
                                    secondary: c.bytes(64),
                                },
                                8 => SubItem::UserIdentityAc {
                                    server_response: c.bytes(64),
                                },
                                // Unknown sub-item types (0x5A..0xFF and below 0x51).
                                _ => SubItem::Unknown {
                                    item_type: 0x5A + c.u8() % 0xA0,
                                    data: c.bytes(32),
                                },
                            });
                        }
                        Item::UserInformation(subs)
                    }
                    _ => Item::Unknown {
                        item_type: 0x60 + c.u8() % 0x90,
                        data: c.bytes(32),
                    },
                };
                items.push(item);
            }
            // At most one user information item is legal.
            let mut seen_user = false;
            items.retain(|i| {
                !matches!(i, Item::UserInformation(_)) || !std::mem::replace(&mut seen_user, true)
            });
            let a = Associate {
                protocol_version: u16::from_be_bytes([c.u8(), c.u8()]),
                called_ae: [c.u8(); 16],
                calling_ae: [c.u8(); 16],
                items,
                reserved: Default::default(),
            };
            if is_rq {
                Pdu::AssociateRq(a)
            } else {
                Pdu::AssociateAc(a)
            }
        }
        2 => Pdu::AssociateRj(AssociateRj {
            result: RejectResult(c.u8()),
            source: RejectSource(c.u8()),
            reason: c.u8(),
            reserved: [0; 2],
        }),
        3 => Pdu::RELEASE_RQ,
        4 => Pdu::RELEASE_RP,
        5 => Pdu::Abort(Abort {
            source: AbortSource(c.u8()),
            reason: AbortReason(c.u8()),
            reserved: [0; 3],
        }),
        _ => {
            let mut body = Vec::new();
            for _ in 0..1 + c.u8() % 4 {
                let d = c.bytes(200);
                body.extend_from_slice(&(d.len() as u32 + 2).to_be_bytes());
                body.push(c.u8() | 1);
                body.push(c.u8() & 3);
                body.extend_from_slice(d);
            }
            // A P-DATA-TF is built as bytes (its PDVs are a view) and checked through decode.
            let mut pdu = vec![4, 0];
            pdu.extend_from_slice(&(body.len() as u32).to_be_bytes());
            pdu.extend_from_slice(&body);
            let p = decode(&pdu).expect("a well-formed P-DATA-TF decodes");
            let mut again = Vec::new();
            p.encode(&mut again).expect("encodes");
            assert_eq!(again, pdu);
            return;
        }
    };
    let mut bytes = Vec::new();
    if pdu.encode(&mut bytes).is_err() {
        return; // a built field longer than its prefix allows: nothing to compare
    }
    let decoded = decode(&bytes).expect("what we encode decodes");
    // Rejected-context ACs without a TS, empty TS lists etc. are not built, so equality holds.
    assert_eq!(decoded, pdu, "encode → decode changed the PDU");
    let mut again = Vec::new();
    decoded.encode(&mut again).expect("encodes twice");
    assert_eq!(again, bytes, "encode → decode → encode is not byte-exact");
}

/// The same stream delivered in arbitrary chunks (first byte of each chunk picks its size) gives
/// the same PDUs and the same error as the whole stream at once.
pub fn deframer_chunked(data: &[u8]) {
    const MAX: u32 = 16 * 1024;
    let (sizes, stream) = data.split_at(data.len().min(16));
    let whole = frames(stream, MAX);
    let mut buf: Vec<u8> = Vec::new();
    let mut got = Vec::new();
    let mut err = None;
    let mut fed = 0;
    let mut k = 0;
    while fed < stream.len() && err.is_none() {
        let n = (sizes.get(k % sizes.len().max(1)).copied().unwrap_or(7) as usize % 64 + 1)
            .min(stream.len() - fed);
        k += 1;
        buf.extend_from_slice(&stream[fed..fed + n]);
        fed += n;
        loop {
            match ul::deframe(&buf, MAX) {
                Ok(Status::Complete(len)) => {
                    got.push(buf.drain(..len).collect::<Vec<u8>>());
                }
                Ok(Status::Partial { .. }) => break,
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
    }
    assert_eq!(
        (got, err),
        whole,
        "chunked deframing differs from whole-buffer deframing"
    );
}

fn frames(stream: &[u8], max: u32) -> (Vec<Vec<u8>>, Option<ul::PduError>) {
    let mut out = Vec::new();
    let mut rest = stream;
    loop {
        match ul::deframe(rest, max) {
            Ok(Status::Complete(n)) => {
                out.push(rest[..n].to_vec());
                rest = &rest[n..];
            }
            Ok(Status::Partial { .. }) => return (out, None),
            Err(e) => return (out, Some(e)),
        }
    }
}

/// The top-level scan never panics, in every encoding, what it returns lies within the input, and
/// a scan fed in pieces finds what the scan of the whole finds.
pub fn tag_scan(data: &[u8]) {
    use crate::dicom::transfer_syntax::DatasetEncoding::*;
    use crate::dicom::{scan, tags};
    for enc in [
        ImplicitVrLittleEndian,
        ExplicitVrLittleEndian,
        ExplicitVrBigEndian,
        DeflatedExplicitVrLittleEndian,
    ] {
        let whole = scan::scan(data, enc, tags::ROUTING);
        if let Ok(s) = &whole {
            for t in tags::ROUTING {
                if let Some(v) = s.raw(*t) {
                    // What the scan returns lies within the input: for each value, somewhere in
                    // the input is an element header of that tag, in the encoding's byte order,
                    // whose length field is the value's length, followed by the value. Checked
                    // by a search of the bytes, not by the scanner's own walk (the old check,
                    // `v.len() <= MAX_VALUE_LEN`, held by construction: the scanner copies
                    // nothing longer). A deflated input's values lie in the inflated bytes.
                    if enc != DeflatedExplicitVrLittleEndian {
                        let be = enc == ExplicitVrBigEndian;
                        assert!(
                            occurs_as_element(data, *t, v, be),
                            "{enc:?}: value {v:?} of tag {t:08X} is not an element of the input"
                        );
                    }
                }
            }
        }
        if enc != DeflatedExplicitVrLittleEndian {
            // Fed in pieces (a streamed data set), cut where the input's first byte says.
            let step = usize::from(data.first().copied().unwrap_or(1)).max(1);
            let mut s = scan::Scanner::new(enc, tags::ROUTING);
            for piece in data.chunks(step) {
                if s.feed(piece).is_err() {
                    break;
                }
            }
            assert_eq!(s.finish(), whole, "pieces of {step} bytes");
        }
    }
}

/// Whether `data` holds an element of `tag` whose value is `value`: the tag (group, element;
/// big endian when `be`), then an implicit-VR 4-byte length, or an explicit VR with a 2-byte
/// length, or an explicit VR, two reserved bytes and a 4-byte length (PS3.5 §7.1), equal to
/// `value.len()`, then `value`.
fn occurs_as_element(data: &[u8], tag: u32, value: &[u8], be: bool) -> bool {
    let (g, e) = ((tag >> 16) as u16, tag as u16);
    let u16b = |x: u16| if be { x.to_be_bytes() } else { x.to_le_bytes() };
    let u32b = |x: u32| if be { x.to_be_bytes() } else { x.to_le_bytes() };
    let tb = [u16b(g), u16b(e)].concat();
    let n = value.len();
    (0..data.len()).any(|i| {
        let at = |off: usize, want: &[u8]| data.get(i + off..i + off + want.len()) == Some(want);
        at(0, &tb)
            && ((at(4, &u32b(n as u32)) && at(8, value))
                || (u16::try_from(n).is_ok_and(|n| at(6, &u16b(n))) && at(8, value))
                || (at(6, &[0, 0]) && at(8, &u32b(n as u32)) && at(12, value)))
    })
}

/// Differential test of the patient map against a `HashMap` model (papaya's habit): a sequence
/// of operations read from the input (insert, get-or-insert, view, claim with the current or a
/// stale batch number, remove-if-empty, list) on a map of few buckets and four keys, each
/// checked against what the model says: the view's snapshot is `Snapshot::of` the model's open
/// batch and its batch number the model's; a claim hands over exactly the model's batch, oldest
/// first, and a stale one nothing; a patient is removed exactly when its batch is empty, and the
/// map lists exactly the model's keys. One thread (the interleavings are the loom models' and
/// the stress test's); what this finds is a wrong answer, not a race.
pub fn patient_map_differential(data: &[u8]) {
    use crate::patients::{InstanceRecord, PatientMap, Snapshot};
    use std::collections::HashMap;
    let map = PatientMap::new(2);
    // key → (open batch, oldest first; its batch number)
    let mut model: HashMap<Vec<u8>, (Vec<InstanceRecord>, u64)> = HashMap::new();
    let mut c = Choices::new(data);
    let mut n = 0u32;
    while !c.done() {
        let op = c.u8() % 8;
        let key = vec![b'P', b'0' + c.u8() % 4];
        let g = map.pin();
        match op {
            0..=2 => {
                n += 1;
                let r = InstanceRecord {
                    sop_instance_uid: format!("1.2.{n}").into(),
                    study_uid: Some(format!("1.{}", c.u8() % 2).into()),
                    series_uid: Some(format!("1.{}", c.u8() % 3).into()),
                    study_date: c.u8().is_multiple_of(2).then(|| "20261201".into()),
                    bytes: u64::from(c.u8()),
                    inputs: u64::from(c.u8() % 8),
                    instance_number: u32::from(c.u8()),
                    ..Default::default()
                };
                map.insert(&key, r.clone(), u64::from(n), &g);
                model.entry(key).or_insert((Vec::new(), 0)).0.push(r);
            }
            3 => {
                map.get_or_insert(&key, 0, &g);
                model.entry(key).or_insert((Vec::new(), 0));
            }
            4 => match (map.get(&key, &g), model.get(&key)) {
                (Some(p), Some((batch, seq))) => {
                    let v = p.view(&g);
                    assert_eq!(v.batch_seq, *seq, "batch number of {key:?}");
                    assert_eq!(*v.snapshot, Snapshot::of(batch), "snapshot of {key:?}");
                }
                (None, None) => {}
                (p, m) => panic!(
                    "{key:?}: map has {:?}, model {:?}",
                    p.is_some(),
                    m.is_some()
                ),
            },
            5 => {
                let stale = c.u8().is_multiple_of(4);
                match (map.get(&key, &g), model.get_mut(&key)) {
                    (Some(p), Some((batch, seq))) => {
                        let v = p.view(&g);
                        if stale {
                            let old = v.batch_seq.wrapping_sub(1);
                            assert!(p.claim(old, &g).is_none(), "stale claim of {key:?} won");
                        } else {
                            let claimed = p.claim(v.batch_seq, &g).expect("the only claimer wins");
                            assert_eq!(claimed.seq, *seq);
                            assert_eq!(claimed.records, *batch, "claim of {key:?}");
                            batch.clear();
                            *seq += 1;
                        }
                    }
                    (None, None) => {}
                    (p, m) => {
                        panic!(
                            "{key:?}: map has {:?}, model {:?}",
                            p.is_some(),
                            m.is_some()
                        )
                    }
                }
            }
            6 => {
                if let Some(p) = map.get(&key, &g) {
                    let empty = model.get(&key).is_some_and(|(b, _)| b.is_empty());
                    assert_eq!(map.remove_if_empty(&p, &g), empty, "remove {key:?}");
                    if empty {
                        model.remove(&key);
                        assert!(map.get(&key, &g).is_none(), "{key:?} removed but found");
                    }
                }
            }
            _ => {
                let mut keys: Vec<Vec<u8>> =
                    map.patients(&g).iter().map(|p| p.key().to_vec()).collect();
                keys.sort();
                let mut want: Vec<Vec<u8>> = model.keys().cloned().collect();
                want.sort();
                assert_eq!(keys, want, "the map's patients");
                assert_eq!(map.len(), model.len());
            }
        }
    }
}

/// Differential test of the routing scan against a reference reader (dicom-rs in the fuzz
/// target and its test; the library does not depend on it). `reference(data, tags)` returns its
/// text value of each tag. Returns how many values were compared.
///
/// Only inputs where the comparison is fair and safe reach the reference: explicit VR little
/// endian, a flat data set (no sequences, items or undefined lengths) of standard VRs whose every
/// length lies within the input and is a whole number of values, at most 64 KiB. Under those conditions the reference cannot be
/// made to allocate by a declared length or to recurse (the hazards of a full parse on untrusted
/// bytes), and both readers see the same elements. Compared: routing tags that occur once, with
/// a text VR, whose value is printable ASCII without a backslash; both sides' values lose their
/// padding the same way (trailing spaces and NULs, leading spaces).
pub fn tag_scan_differential(
    data: &[u8],
    reference: impl FnOnce(&[u8], &[u32]) -> Option<Vec<Option<String>>>,
) -> usize {
    use crate::dicom::transfer_syntax::DatasetEncoding;
    use crate::dicom::vr::{trim_padding, Vr};
    use crate::dicom::{scan, tags};
    if data.len() > 64 * 1024 {
        return 0;
    }
    // Our own flat walk: every header, VR known, every length within the input.
    let mut pos = 0;
    let mut seen: Vec<(u32, Vr, &[u8])> = Vec::new();
    while pos < data.len() {
        let Some(h) = data.get(pos..pos + 8) else {
            return 0;
        };
        let tag = (u16::from_le_bytes([h[0], h[1]]) as u32) << 16
            | u16::from_le_bytes([h[2], h[3]]) as u32;
        let vr = Vr([h[4], h[5]]);
        if tag >> 16 == 0xFFFE || vr == Vr::SQ || vr == Vr::UN {
            return 0;
        }
        // Standard VRs only (the one VR table, PS3.5 Table 6.2-1 and §7.1.2).
        let Some(info) = vr.info() else {
            return 0;
        };
        let (len, hdr) = if info.long_length {
            let Some(l) = data.get(pos + 8..pos + 12) else {
                return 0;
            };
            (u32::from_le_bytes([l[0], l[1], l[2], l[3]]) as usize, 12)
        } else {
            (u16::from_le_bytes([h[6], h[7]]) as usize, 8)
        };
        let Some(v) = data.get(pos + hdr..pos + hdr + len) else {
            return 0;
        };
        // A binary value whose length is not a whole number of values desynchronises dicom-rs
        // 0.10.1 (it reads the whole values and goes on 1-7 bytes early), after which it reads a
        // length from value bytes and allocates it: 775 MB for a 294-byte input (the fuzzer's
        // first finding; regression test `odd_binary_length_never_reaches_the_reference`).
        let unit = usize::from(info.unit);
        if len % unit != 0 {
            return 0;
        }
        seen.push((tag, vr, v));
        pos += hdr + len;
    }
    let Ok(ours) = scan::scan(data, DatasetEncoding::ExplicitVrLittleEndian, tags::ROUTING) else {
        return 0;
    };
    // The text VRs the routing tags have (not every text VR: the comparison is of these).
    let text_vr = |vr: &Vr| [Vr::AE, Vr::CS, Vr::LO, Vr::PN, Vr::SH, Vr::UI, Vr::DA].contains(vr);
    let comparable: Vec<(u32, &[u8])> = tags::ROUTING
        .iter()
        .filter_map(|&t| {
            let mut it = seen.iter().filter(|(tag, _, _)| *tag == t);
            let (_, vr, v) = it.next()?;
            (it.next().is_none()
                && text_vr(vr)
                && v.iter().all(|&b| (0x20..0x7F).contains(&b) || b == 0)
                && !v.contains(&b'\\'))
            .then_some((t, *v))
        })
        .collect();
    if comparable.is_empty() {
        return 0;
    }
    let wanted: Vec<u32> = comparable.iter().map(|(t, _)| *t).collect();
    let Some(theirs) = reference(data, &wanted) else {
        return 0;
    };
    let norm = |s: &[u8]| -> Vec<u8> { trim_padding(s).trim_ascii_start().to_vec() };
    for ((tag, _), their) in comparable.iter().zip(theirs) {
        let mine = ours.raw(*tag).map(norm);
        let their = their.map(|s| norm(s.as_bytes()));
        assert_eq!(
            mine, their,
            "tag {tag:08X}: our scan and the reference reader disagree"
        );
    }
    comparable.len()
}

/// PDVs from fuzz bytes into the assembler: never panics, never holds more than the bounds.
pub fn dimse_message(data: &[u8]) {
    use crate::dimse::{command, Assembler};
    let _ = command::decode(data);
    let mut c = Choices::new(data);
    let mut a = Assembler::new(4096);
    while !c.done() {
        let pdv = ul::Pdv {
            presentation_context_id: c.u8() % 4 * 2 + 1,
            message_control_header: c.u8() & 3,
            data: c.bytes(255),
        };
        match a.push(pdv, |id| id != 7) {
            Ok(_) => assert!(a.buffered() <= command::MAX_COMMAND_LEN.max(4096)),
            Err(_) => a = Assembler::new(4096),
        }
    }
}

/// An A-ASSOCIATE-RQ proposing CT Image Storage (explicit and implicit LE, contexts 1 and 3)
/// and Verification (context 5), with an asynchronous operations window of `window`.
fn service_associate_rq(window: u16) -> Vec<u8> {
    use crate::dicom::sop_class::{CT_IMAGE_STORAGE, VERIFICATION};
    use crate::dicom::transfer_syntax::EXPLICIT_VR_LITTLE_ENDIAN;
    use crate::ul::*;
    let pc = |id: u8, abs: &'static str, ts: &'static str| {
        Item::PresentationContextRq(PresentationContextRq {
            field: &[],
            id,
            reserved: [0; 3],
            abstract_syntax: abs.as_bytes(),
            transfer_syntaxes: vec![ts.as_bytes()],
        })
    };
    let rq = Pdu::AssociateRq(Associate {
        protocol_version: 1,
        called_ae: ae_title_field("DICOMGATE"),
        calling_ae: ae_title_field("FUZZ"),
        items: vec![
            Item::ApplicationContext(DICOM_APPLICATION_CONTEXT),
            pc(1, CT_IMAGE_STORAGE, EXPLICIT_VR_LITTLE_ENDIAN),
            pc(3, CT_IMAGE_STORAGE, "1.2.840.10008.1.2"),
            pc(5, VERIFICATION, "1.2.840.10008.1.2"),
            Item::UserInformation(vec![
                SubItem::MaximumLength(16384),
                SubItem::ImplementationClassUid(b"1.2.3.4"),
                SubItem::AsynchronousOperationsWindow {
                    max_invoked: window,
                    max_performed: 1,
                },
            ]),
        ],
        reserved: Default::default(),
    });
    let mut out = Vec::new();
    rq.encode(&mut out).expect("encodable");
    out
}

/// The encoded command of a C-STORE-RQ (or C-ECHO-RQ) with this message ID, for instance `i`.
fn service_command(echo: bool, id: u16, i: u8) -> Vec<u8> {
    use crate::dimse::command::{self, command_field, CommandSet, NO_DATA_SET};
    let c = if echo {
        CommandSet {
            command_field: command_field::C_ECHO_RQ,
            message_id: Some(id),
            affected_sop_class_uid: Some(b"1.2.840.10008.1.1".to_vec()),
            command_data_set_type: NO_DATA_SET,
            ..Default::default()
        }
    } else {
        CommandSet {
            command_field: command_field::C_STORE_RQ,
            message_id: Some(id),
            affected_sop_class_uid: Some(
                crate::dicom::sop_class::CT_IMAGE_STORAGE
                    .as_bytes()
                    .to_vec(),
            ),
            affected_sop_instance_uid: Some(format!("1.2.3.{i}").into_bytes()),
            priority: Some(0),
            command_data_set_type: 0,
            ..Default::default()
        }
    };
    let mut out = Vec::new();
    command::encode(&c, &mut out);
    out
}

/// A small data set for instance `i` (its SOP UIDs match [`service_command`]'s).
fn service_data_set(i: u8) -> Vec<u8> {
    use crate::dicom::element::put;
    use crate::dicom::transfer_syntax::DatasetEncoding::ExplicitVrLittleEndian as E;
    use crate::dicom::{sop_class::CT_IMAGE_STORAGE, tags, vr::Vr};
    let mut d = Vec::new();
    put(
        &mut d,
        E,
        tags::SOP_CLASS_UID,
        Vr::UI,
        CT_IMAGE_STORAGE.as_bytes(),
    );
    let sop = format!("1.2.3.{i}");
    put(&mut d, E, tags::SOP_INSTANCE_UID, Vr::UI, sop.as_bytes());
    put(&mut d, E, tags::PATIENT_ID, Vr::LO, b"FUZZ");
    d
}

/// Arbitrary PDV sequences (valid messages, fragments of them, and raw bytes, packed into
/// P-DATA-TF PDUs of any shape) against the acceptor's DIMSE service, with storage completing
/// its stores in any order, release, abort, timers and transport closes in between. Never panics;
/// outstanding stores stay within the window plus what one PDU carries; every store handed out
/// is answered at most once and no response names a message never sent.
pub fn dimse_service(data: &[u8]) {
    use crate::dimse::service::{Service, StoreOutcome, Work};
    use std::time::{Duration, Instant};
    let mut c = Choices::new(data);
    let window = u16::from(c.u8() % 8) + 1;
    // Data sets above this are streamed in chunks (most fuzz data sets are a few dozen bytes).
    let stream_above = usize::from(c.u8() % 64);
    let mut cfg =
        crate::config::Config::default().service_config(crate::dicom::tags::ROUTING.to_vec());
    cfg.policy.max_operations_performed = window;
    cfg.max_message_bytes = 4096;
    cfg.max_pdu_length = 16384;
    cfg.stream_above = stream_above;
    let mut now = Instant::now();
    let mut svc = Service::new(now, &cfg);
    let mut inbox = service_associate_rq(window);
    let mut handed: Vec<u64> = Vec::new();
    let mut writes: Vec<(u64, usize)> = Vec::new();
    // Tokens whose Store or Discard was handed out: no Write of theirs may follow.
    let mut finished = std::collections::HashSet::new();
    let mut sent_ids: Vec<u16> = Vec::new();
    let mut answered = 0usize;
    let mut granted = true;
    // Inbox bytes the service was already told it received.
    let mut told = 0usize;
    while !c.done() {
        match c.u8() % 8 {
            0..=3 => {
                // One P-DATA-TF of up to 8 PDVs.
                let mut body = Vec::new();
                for _ in 0..1 + c.u8() % 8 {
                    let pc = [1u8, 3, 5, 7][usize::from(c.u8() % 4)];
                    let k = c.u8();
                    let bytes: Vec<u8> = match k % 6 {
                        0 | 1 => {
                            let id = u16::from(c.u8());
                            sent_ids.push(id);
                            service_command(k % 6 == 1, id, c.u8())
                        }
                        2 => service_data_set(c.u8()),
                        3 => {
                            let whole = service_data_set(c.u8());
                            let cut = usize::from(c.u8()) % (whole.len() + 1);
                            whole[..cut].to_vec()
                        }
                        _ => c.bytes(64).to_vec(),
                    };
                    let mch = c.u8() & 3;
                    body.extend_from_slice(&(bytes.len() as u32 + 2).to_be_bytes());
                    body.push(pc);
                    body.push(mch);
                    body.extend_from_slice(&bytes);
                }
                inbox.extend_from_slice(&[0x04, 0]);
                inbox.extend_from_slice(&(body.len() as u32).to_be_bytes());
                inbox.extend_from_slice(&body);
            }
            4 if c.u8().is_multiple_of(2) && !writes.is_empty() => {
                // Storage writes one handed-out chunk (any of them).
                let i = usize::from(c.u8()) % writes.len();
                let (token, n) = writes.swap_remove(i);
                svc.handle_written(now, token, n);
            }
            4 => {
                // Storage completes one handed-out store (any of them), or fails it.
                if !handed.is_empty() {
                    let i = usize::from(c.u8()) % handed.len();
                    let token = handed.swap_remove(i);
                    let outcome = if c.u8().is_multiple_of(4) {
                        StoreOutcome::Failed {
                            status: 0xA700,
                            comment: "full".into(),
                        }
                    } else {
                        StoreOutcome::Stored { bytes: 1 }
                    };
                    svc.handle_store_done(now, token, outcome);
                }
            }
            5 => match c.u8() % 4 {
                0 => inbox.extend_from_slice(&[0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0]),
                1 => inbox.extend_from_slice(&[0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0]),
                2 => svc.abort(now, "fuzz"),
                _ => inbox.extend_from_slice(c.bytes(16)),
            },
            6 => {
                if c.u8().is_multiple_of(4) {
                    svc.handle_read_paused(now);
                }
                now += Duration::from_secs(u64::from(c.u8()));
                svc.handle_timeout(now);
            }
            _ => svc.handle_transport_closed(now),
        }
        // The host's part: feed what the service takes, hand stores out, write.
        let pdvs_in_pdu = 8;
        svc.handle_received(now, inbox.len().saturating_sub(told));
        let n = svc.handle_input(now, &inbox, &cfg, &granted);
        granted = !granted || c.u8().is_multiple_of(2);
        inbox.drain(..n);
        told = inbox.len();
        let outstanding = svc.stores_waiting() + svc.stores_in_flight();
        assert!(
            outstanding <= usize::from(window) + pdvs_in_pdu,
            "outstanding {outstanding} beyond window {window} + one PDU"
        );
        assert!(
            svc.store_bytes()
                <= 4096 * usize::from(window) + crate::dimse::service::STREAM_WINDOW + 16384,
            "held {} bytes",
            svc.store_bytes()
        );
        while handed.len() < 4 && writes.len() < 64 {
            match svc.poll_work() {
                None => break,
                Some(Work::Store(s)) => {
                    assert!(finished.insert(s.token), "one Store per token");
                    handed.push(s.token)
                }
                Some(Work::Write(w)) => {
                    assert!(
                        !finished.contains(&w.token),
                        "a Write after its Store/Discard"
                    );
                    writes.push((w.token, w.bytes.len()))
                }
                Some(Work::Discard { token }) => {
                    finished.insert(token);
                }
            }
        }
        let out = std::mem::take(svc.transmit());
        let mut pos = 0;
        while pos + 6 <= out.len() {
            let len = u32::from_be_bytes([out[pos + 2], out[pos + 3], out[pos + 4], out[pos + 5]])
                as usize;
            let pdu = &out[pos..pos + 6 + len];
            if let Ok(ul::Pdu::PDataTf(p)) = ul::decode(pdu) {
                for pdv in p.pdvs() {
                    let rsp =
                        crate::dimse::command::decode(pdv.data).expect("our response decodes");
                    let id = rsp
                        .message_id_being_responded_to
                        .expect("names its request");
                    assert!(
                        sent_ids.contains(&id),
                        "response to message {id}, never sent"
                    );
                    answered += 1;
                }
            }
            pos += 6 + len;
        }
        assert_eq!(pos, out.len(), "whole PDUs only");
        while svc.poll_event().is_some() {}
        if svc.is_closed() {
            for t in handed.drain(..) {
                svc.handle_store_done(now, t, StoreOutcome::Stored { bytes: 1 });
            }
            for (t, n) in writes.drain(..) {
                svc.handle_written(now, t, n);
            }
            while let Some(w) = svc.poll_work() {
                assert!(
                    matches!(w, Work::Discard { .. }),
                    "only discards once closed"
                );
            }
            assert_eq!(svc.stores_in_flight(), 0);
            assert_eq!(svc.work_in_flight(), 0);
            assert_eq!(svc.held_bytes(), 0, "everything given back");
            assert!(svc.transmit().is_empty(), "nothing sent once closed");
            break;
        }
    }
    assert!(answered <= sent_ids.len());
}

/// Whatever bytes recovery finds in a segment: the segment header, the record scan and the
/// release entries never panic or over-read; every record found re-encodes to exactly the
/// bytes it was decoded from; the scan ends inside the input.
pub fn log_record(data: &[u8]) {
    use crate::storage::log::format;
    let seq = u64::from(data.first().copied().unwrap_or(0) % 4);
    let _ = format::SegmentHeader::decode(data);
    let _ = format::decode_releases(data, seq);
    let body = data.get(1..).unwrap_or(&[]);
    let (records, end) = format::scan_records(body, seq);
    assert!(end <= body.len());
    for (off, r) in records {
        let again = format::encode_record(seq, &r.meta, r.data_set).expect("re-encodes");
        let (total, _) = format::decode_header(&body[off..], seq).expect("valid header");
        assert_eq!(&again[..total], &body[off..off + total], "byte-exact");
        assert_eq!(again.len(), r.stride);
    }
    // A record built from the fuzz bytes round-trips too.
    let meta = format::InstanceMeta {
        sop_instance_uid: String::from_utf8_lossy(data.get(..data.len().min(64)).unwrap_or(&[]))
            .into_owned(),
        patient_id: data.get(..data.len().min(16)).unwrap_or(&[]).to_vec(),
        ..Default::default()
    };
    let rec = format::encode_record(seq, &meta, data).expect("encodes");
    let back = format::decode_record(&rec, seq).expect("decodes");
    assert_eq!(back.meta, meta);
    assert_eq!(back.data_set, data);
}

/// Random events against both sides of the association machine: no panic, and once aborted the
/// machine reaches Sta1 when the transport closes.
pub fn assoc_events(data: &[u8]) {
    use crate::assoc::{Association, State, Timeouts};
    use std::time::{Duration, Instant};
    let rq = ul::decode(&SAMPLE_RQ).expect("sample RQ");
    let ac = ul::decode(&SAMPLE_AC).expect("sample AC");
    let t0 = Instant::now();
    for requestor in [false, true] {
        let mut c = Choices::new(data);
        let mut now = t0;
        let mut a = if requestor {
            Association::requestor(now, Timeouts::default())
        } else {
            Association::acceptor(now, Timeouts::default())
        };
        while !c.done() {
            now += Duration::from_secs(u64::from(c.u8() % 8));
            let op = c.u8() % 16;
            match op {
                0 => drop(a.handle_pdu(now, rq.clone())),
                1 => drop(a.handle_pdu(now, ac.clone())),
                2 => drop(a.handle_pdu(now, ul::Pdu::RELEASE_RQ)),
                3 => drop(a.handle_pdu(now, ul::Pdu::RELEASE_RP)),
                4 => drop(a.handle_pdu(
                    now,
                    ul::Pdu::Abort(ul::Abort {
                        source: ul::AbortSource(c.u8()),
                        reason: ul::AbortReason(c.u8()),
                        reserved: [0; 3],
                    }),
                )),
                5 => drop(a.handle_pdu(
                    now,
                    ul::Pdu::AssociateRj(ul::AssociateRj {
                        result: ul::RejectResult(1),
                        source: ul::RejectSource(1),
                        reason: 1,
                        reserved: [0; 2],
                    }),
                )),
                6 => a.handle_invalid_pdu(now, ul::PduError::UnrecognizedPdu(c.u8())),
                7 => a.handle_timeout(now),
                8 => drop(a.accept(now, &SAMPLE_AC)),
                9 => drop(a.reject(
                    now,
                    ul::AssociateRj {
                        result: ul::RejectResult(1),
                        source: ul::RejectSource(1),
                        reason: 7,
                        reserved: [0; 2],
                    },
                )),
                10 => drop(a.release_request()),
                11 => drop(a.release_response(now)),
                12 => drop(a.abort(now)),
                13 => drop(a.send_pdata(|o| o.push(0))),
                14 => drop(a.request(now, &rq)),
                _ => a.set_message_in_progress(c.u8().is_multiple_of(2)),
            }
            while a.poll_event().is_some() {}
            a.transmit().clear();
            if a.state() == State::Sta13 {
                // After an abort or reject, a transport close always ends in Sta1.
                let mut b =
                    std::mem::replace(&mut a, Association::requestor(now, Timeouts::default()));
                if c.u8().is_multiple_of(2) {
                    b.handle_transport_closed(now);
                    assert_eq!(b.state(), State::Sta1);
                } else {
                    a = b;
                }
            }
        }
    }
}

const SAMPLE_RQ: [u8; 74 + 25 + 4 + 4 + 21 + 4 + 17] = sample_associate(1);
const SAMPLE_AC: [u8; 74 + 25 + 4 + 4 + 21 + 4 + 17] = sample_associate(2);

/// Copies `src` into `b` at `p` (a loop, as `copy_from_slice` is not const).
const fn put<const L: usize>(b: &mut [u8; L], p: usize, src: &[u8]) {
    let mut k = 0;
    while k < src.len() {
        b[p + k] = src[k];
        k += 1;
    }
}

/// A minimal A-ASSOCIATE-RQ (type 1) or -AC (type 2): application context, one Verification
/// context (RQ: abstract + transfer syntax; AC: accepted with a transfer syntax sub-item, padded
/// to the same size by an unknown item), no user information.
const fn sample_associate(t: u8) -> [u8; 74 + 25 + 4 + 4 + 21 + 4 + 17] {
    const APP: &[u8; 21] = b"1.2.840.10008.3.1.1.1";
    const VER: &[u8; 17] = b"1.2.840.10008.1.1";
    const TS: &[u8; 17] = b"1.2.840.10008.1.2";
    let mut b = [0u8; 74 + 25 + 4 + 4 + 21 + 4 + 17];
    let total = b.len() - 6;
    b[0] = t;
    b[5] = total as u8;
    b[7] = 1; // protocol version
    let mut i = 10;
    while i < 42 {
        b[i] = b'A';
        i += 1;
    }
    let mut p = 74;
    b[p] = 0x10;
    b[p + 3] = 21;
    p += 4;
    put(&mut b, p, APP);
    p += 21;
    if t == 1 {
        b[p] = 0x20;
        b[p + 3] = (4 + 4 + 17 + 4 + 17) as u8;
        b[p + 4] = 1;
        p += 8;
        b[p] = 0x30; // abstract syntax
        b[p + 3] = 17;
        p += 4;
        put(&mut b, p, VER);
        p += 17;
    } else {
        // AC: the accepted context (its transfer syntax only: PS3.8 §9.3.3.2), then an unknown
        // item of the abstract syntax sub-item's size (ignored, PS3.8 §9.3.1).
        b[p] = 0x21;
        b[p + 3] = (4 + 4 + 17) as u8;
        b[p + 4] = 1;
        p += 8;
        b[p] = 0x40;
        b[p + 3] = 17;
        put(&mut b, p + 4, TS);
        p += 4 + 17;
        b[p] = 0x31;
        b[p + 3] = 17;
        put(&mut b, p + 4, VER);
        return b;
    }
    b[p] = 0x40;
    b[p + 3] = 17;
    p += 4;
    put(&mut b, p, TS);
    b
}

/// A self-signed P-256 certificate and its key, for [`tls_server`] only (no secret: it
/// authenticates nothing).
const FUZZ_TLS_CERTIFICATE: &str = "-----BEGIN CERTIFICATE-----\nMIIBijCCAS+gAwIBAgIUcCztkPV/47N8ZfUTChoR/8zjtWMwCgYIKoZIzj0EAwIw\nGTEXMBUGA1UEAwwOZGljb21nYXRlIGZ1enowIBcNMjYxMjAxMTM1OTIyWhgPMjEy\nNjExMDcxMzU5MjJaMBkxFzAVBgNVBAMMDmRpY29tZ2F0ZSBmdXp6MFkwEwYHKoZI\nzj0CAQYIKoZIzj0DAQcDQgAEdh4HCBll9ia0tS1FPR1PriZkGC3ERtBO7RKZAY5H\nzpNPxgeEI+pwRRrQfcfpuWIH7R2H2vcQyobz6NT777TSNKNTMFEwHQYDVR0OBBYE\nFFL1D716PVK3oQc2xqK3Sf4gWGSmMB8GA1UdIwQYMBaAFFL1D716PVK3oQc2xqK3\nSf4gWGSmMA8GA1UdEwEB/wQFMAMBAf8wCgYIKoZIzj0EAwIDSQAwRgIhAP+U5XFg\n00Bqlv5a4kKAJ9ja2MXVoO63qHa+KN4I+q90AiEA2FUdBYHLD0ZL101+AXMQPLwF\nKqWnxucBaWPUiQImHLQ=\n-----END CERTIFICATE-----\n";
const FUZZ_TLS_KEY: &str = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQglCnkU6LHUmEbF+Re\nro2MRzEzsnSg+7ZilhnKONKuJ3ChRANCAAR2HgcIGWX2JrS1LUU9HU+uJmQYLcRG\n0E7tEpkBjkfOk0/GB4Qj6nBFGtB9x+m5YgftHYfa9xDKhvPo1PvvtNI0\n-----END PRIVATE KEY-----\n";

/// A peer's bytes into the TLS listener's session ([`crate::net::tls::Session`]), before,
/// during and after the handshake: the first byte sets how many bytes the fake socket gives per
/// read (1-64), the rest is what the peer sends; between reads the association's side writes.
/// Never panics; each call either makes progress, would block, or ends the connection with an
/// error (after which nothing more is read); what the session holds stays bounded.
pub fn tls_server(data: &[u8]) {
    use crate::net::tls::Session;
    use rustls::pki_types::pem::PemObject;
    use std::io;
    use std::sync::{Arc, OnceLock};
    static CONFIG: OnceLock<Option<Arc<rustls::ServerConfig>>> = OnceLock::new();
    let config = CONFIG.get_or_init(|| {
        let certs: Vec<_> =
            rustls::pki_types::CertificateDer::pem_slice_iter(FUZZ_TLS_CERTIFICATE.as_bytes())
                .collect::<Result<_, _>>()
                .ok()?;
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(FUZZ_TLS_KEY.as_bytes()).ok()?;
        rustls::ServerConfig::builder_with_provider(Arc::new(crate::net::tls::profile_provider()))
            .with_protocol_versions(crate::net::tls::VERSIONS)
            .ok()?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .ok()
            .map(Arc::new)
    });
    let (Some(config), Some((&step, input))) = (config.clone(), data.split_first()) else {
        return;
    };
    struct Sock<'a> {
        input: &'a [u8],
        step: usize,
        /// One read may be served, then WouldBlock until the next round.
        readable: bool,
        written: usize,
    }
    impl io::Read for Sock<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if !self.readable || self.input.is_empty() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.readable = false;
            let n = self.step.min(self.input.len()).min(buf.len());
            buf[..n].copy_from_slice(&self.input[..n]);
            self.input = &self.input[n..];
            Ok(n)
        }
    }
    impl io::Write for Sock<'_> {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.written += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let Ok(mut session) = Session::new(config) else {
        return;
    };
    let mut sock = Sock {
        input,
        step: step as usize % 64 + 1,
        readable: false,
        written: 0,
    };
    let mut plain = [0u8; 97];
    // An A-ABORT PDU: what the association side might answer at any point.
    let answer = [0x07, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x02, 0x00];
    while !sock.input.is_empty() {
        sock.readable = true;
        match session.read_plaintext(&mut sock, &mut plain) {
            Ok(n) => assert!(n <= plain.len()),
            Err(_) => return, // alert sent as far as possible; the reactor closes here
        }
        if session.write_plaintext(&mut sock, &answer).is_err() {
            return;
        }
        // The socket takes everything, so nothing of ours waits in the session.
        assert!(!session.wants_write() || session.is_handshaking());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The TLS body on its seeds (a real ClientHello at several read sizes) and on garbage.
    #[test]
    fn tls_server_body_runs_on_seeds_and_garbage() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/seeds/tls_server");
        let mut n = 0;
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let seed = std::fs::read(e.path()).unwrap();
            for step in [0u8, 1, 7, 63] {
                let mut d = seed.clone();
                if let Some(b) = d.first_mut() {
                    *b = step;
                }
                tls_server(&d);
            }
            n += 1;
        }
        assert!(n > 0, "no seeds in {dir}");
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for len in [0, 1, 5, 6, 100, 5000] {
            let d = xorshift_bytes(&mut x, len);
            tls_server(&d);
        }
    }

    /// Every captured vector, whole and in pieces, goes through the fuzz body.
    #[test]
    fn negotiate_at_the_door_accepts_a_listed_user_with_a_vendor_class() {
        use crate::ul::{ae_title_field, Associate, Item, PresentationContextRq, SubItem};
        let rq = Associate {
            protocol_version: 1,
            called_ae: ae_title_field("ANY"),
            calling_ae: ae_title_field("MR1"),
            items: vec![
                Item::ApplicationContext(ul::DICOM_APPLICATION_CONTEXT),
                Item::PresentationContextRq(PresentationContextRq {
                    field: &[],
                    id: 1,
                    reserved: [0; 3],
                    abstract_syntax: b"1.3.12.2.1107.5.9.1",
                    transfer_syntaxes: vec![b"1.2.840.10008.1.2"],
                }),
                Item::UserInformation(vec![SubItem::UserIdentityRq {
                    identity_type: 1,
                    positive_response_requested: 1,
                    primary: b"u",
                    secondary: b"",
                }]),
            ],
            reserved: Default::default(),
        };
        assert!(negotiate_at_the_door(&rq));
        let mut bytes = Vec::new();
        ul::Pdu::AssociateRq(rq).encode(&mut bytes).unwrap();
        pdu_decode(&bytes);
    }

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

    #[test]
    fn every_body_runs_on_vectors_and_pseudo_random_inputs() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors");
        let mut inputs: Vec<Vec<u8>> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "bin"))
            .map(|e| std::fs::read(e.path()).unwrap())
            .collect();
        // A deterministic xorshift stream stands in for the fuzzer in unit tests.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for len in [0usize, 1, 7, 64, 300, 4000] {
            for _ in 0..40 {
                inputs.push(xorshift_bytes(&mut x, len));
            }
        }
        for d in &inputs {
            pdu_decode(d);
            pdu_roundtrip(d);
            deframer_chunked(d);
            tag_scan(d);
            dimse_message(d);
            dimse_service(d);
            log_record(d);
            assoc_events(d);
            patient_map_differential(d);
        }
    }

    /// The patient map against a `HashMap`, on 2,000 seeded pseudo-random operation sequences
    /// (the fuzz target `patient_map` explores further), so that `cargo test` runs the
    /// differential too.
    #[test]
    fn patient_map_differential_seeded() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..2_000 {
            let len = (x % 400) as usize;
            let input = xorshift_bytes(&mut x, len);
            patient_map_differential(&input);
        }
    }

    /// Issue 11: the `tag_scan` oracle (`value.len() <= MAX_VALUE_LEN`) held by construction.
    /// It now finds each returned value as an element of the input, which a scan returning
    /// other bytes (a value cut short, read at the wrong offset) fails.
    #[test]
    fn the_tag_scan_oracle_checks_values_against_the_input() {
        let ct = crate::bench::synthetic::CtInstance {
            patient_id: "PAT-1",
            study_uid: "1.2.3",
            series_uid: "1.2.3.4",
            sop_instance_uid: "1.2.3.4.5",
            instance_number: 7,
            frames: 1,
        };
        let d = crate::bench::synthetic::ct_data_set(&ct, &[0; 16]);
        tag_scan(&d);
        let s = crate::dicom::scan::scan(
            &d,
            crate::dicom::transfer_syntax::DatasetEncoding::ExplicitVrLittleEndian,
            crate::dicom::tags::ROUTING,
        )
        .unwrap();
        let patient_id = 0x0010_0020;
        assert_eq!(s.raw(patient_id), Some(&b"PAT-1 "[..]));
        assert!(occurs_as_element(&d, patient_id, b"PAT-1 ", false));
        assert!(!occurs_as_element(&d, patient_id, b"PAT-1", false));
        assert!(!occurs_as_element(&d, patient_id, b"PAT-1 ", true));
    }

    /// Writes fuzz/seeds/log_record (real records of the format, one with a torn tail). Run
    /// with `cargo test --lib write_log_record_seeds -- --ignored` after a format change.
    #[test]
    #[ignore]
    fn write_log_record_seeds() {
        use crate::storage::log::format;
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/seeds/log_record");
        std::fs::create_dir_all(dir).unwrap();
        let meta = |i: u8| format::InstanceMeta {
            sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
            sop_instance_uid: format!("1.2.3.{i}"),
            transfer_syntax_uid: "1.2.840.10008.1.2.1".into(),
            source_ae_title: "SCANNER".into(),
            patient_id: b"PAT".to_vec(),
            study_uid: Some("1.2.3".into()),
            series_uid: None,
            received_ms: 1,
            receiving_ae_title: "DICOMGATE".into(),
            requestor_address: "10.0.0.7".into(),
        };
        for n in 1..=3u8 {
            let mut b = vec![1u8];
            for i in 0..n {
                b.extend(format::encode_record(1, &meta(i), &[i; 40]).unwrap());
            }
            if n == 3 {
                b.truncate(b.len() - 30);
            }
            std::fs::write(format!("{dir}/records_{n}.bin"), b).unwrap();
        }
    }

    #[test]
    fn sample_associate_pdus_decode() {
        assert!(matches!(
            ul::decode(&SAMPLE_RQ),
            Ok(ul::Pdu::AssociateRq(_))
        ));
        let Ok(ul::Pdu::AssociateAc(ac)) = ul::decode(&SAMPLE_AC) else {
            panic!()
        };
        assert_eq!(ac.presentation_contexts_ac().count(), 1);
    }
}
