//! Builds a PDU from fuzz bytes: encode → decode → encode is byte-exact. Body: `dicomgate::fuzzing::pdu_roundtrip`, also run by a unit test.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| dicomgate::fuzzing::pdu_roundtrip(data));
