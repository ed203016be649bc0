//! The bounded data set scan never panics in any encoding, and what it returns is an element of the input. Body: `dicomgate::fuzzing::tag_scan`, also run by a unit test.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| dicomgate::fuzzing::tag_scan(data));
