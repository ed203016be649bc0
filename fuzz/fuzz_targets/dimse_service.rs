//! Arbitrary PDV sequences, store completions, releases, aborts and timers against the
//! acceptor's sans-IO DIMSE service. Body: `dicomgate::fuzzing::dimse_service`, also run by a
//! unit test.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| dicomgate::fuzzing::dimse_service(data));
