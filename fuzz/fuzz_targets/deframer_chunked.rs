//! The same stream split at arbitrary points gives the same PDUs and errors. Body: `dicomgate::fuzzing::deframer_chunked`, also run by a unit test.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| dicomgate::fuzzing::deframer_chunked(data));
