//! Command sets and PDV assembly: no panic, bounded buffers. Body: `dicomgate::fuzzing::dimse_message`, also run by a unit test.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| dicomgate::fuzzing::dimse_message(data));
