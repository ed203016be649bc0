//! Random events against both sides of the PS3.8 state machine. Body: `dicomgate::fuzzing::assoc_events`, also run by a unit test.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| dicomgate::fuzzing::assoc_events(data));
