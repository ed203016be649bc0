//! Deframer + PDU parser: never panics; whatever decodes re-encodes to the bytes it came from (reserved fields zeroed). The body lives in
//! `dicomgate::fuzzing::pdu_decode` and is also run by a unit test.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| dicomgate::fuzzing::pdu_decode(data));
