//! The TLS listener's session (plaintext side of the socket: garbage before, during and after
//! the handshake, in reads of every size): never panics. The body lives in
//! `dicomgate::fuzzing::tls_server` and is also run by a unit test.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| dicomgate::fuzzing::tls_server(data));
