//! The patient map against a `HashMap` model: every answer (snapshots, claims, removals, the
//! patient list) is the model's. Body: `dicomgate::fuzzing::patient_map_differential`, also run
//! by a unit test on seeded inputs.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| dicomgate::fuzzing::patient_map_differential(data));
