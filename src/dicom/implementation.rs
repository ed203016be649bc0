//! Our implementation's identity (PS3.7 D.3.3.2): the Implementation Class UID and Version
//! Name we send in every A-ASSOCIATE-RQ and -AC and write into every Part-10 file's meta group
//! (PS3.10 §7.1). Owns these two constants; nothing else.
#![forbid(unsafe_code)]

/// Our Implementation Class UID (PS3.7 D.3.3.2), under the UUID-derived root 2.25.
pub const IMPLEMENTATION_CLASS_UID: &str = "2.25.186117930467893426514372609848271207512";
/// Our Implementation Version Name (PS3.7 D.3.3.2.2: at most 16 characters).
pub const IMPLEMENTATION_VERSION_NAME: &str = concat!("DICOMGATE_", env!("CARGO_PKG_VERSION"));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_identity_is_a_valid_uid_and_a_short_name() {
        assert!(super::super::uid::is_valid_uid(
            IMPLEMENTATION_CLASS_UID.as_bytes()
        ));
        assert!(IMPLEMENTATION_VERSION_NAME.len() <= 16);
    }
}
