//! Whatever bytes recovery finds in a segment log: header, record scan and release entries.
//! Body: `dicomgate::fuzzing::log_record`, also run by a unit test.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| dicomgate::fuzzing::log_record(data));
