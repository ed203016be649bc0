//! Protocol code tables of PS3.8 §9.3 as newtypes with named constants. Unknown values stay
//! representable and print in hex (rustls `msgs/macros.rs` style).

macro_rules! code_table {
    ($(#[$m:meta])* $name:ident { $($(#[$cm:meta])* $konst:ident = $val:expr),* $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash)]
        pub struct $name(pub u8);
        impl $name {
            $($(#[$cm])* pub const $konst: $name = $name($val);)*
            /// The standard's name for this value, if it has one.
            pub fn name(self) -> Option<&'static str> {
                match self.0 {
                    $($val => Some(stringify!($konst)),)*
                    _ => None,
                }
            }
        }
        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                match self.name() {
                    Some(n) => write!(f, "{}({})", n, self.0),
                    None => write!(f, "{}(0x{:02x})", stringify!($name), self.0),
                }
            }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                std::fmt::Debug::fmt(self, f)
            }
        }
    };
}

code_table!(
    /// PDU types, PS3.8 Table 9-11 .. 9-26.
    PduType {
        A_ASSOCIATE_RQ = 0x01,
        A_ASSOCIATE_AC = 0x02,
        A_ASSOCIATE_RJ = 0x03,
        P_DATA_TF = 0x04,
        A_RELEASE_RQ = 0x05,
        A_RELEASE_RP = 0x06,
        A_ABORT = 0x07,
    }
);

code_table!(
    /// A-ABORT source, PS3.8 Table 9-26.
    AbortSource {
        SERVICE_USER = 0,
        RESERVED = 1,
        SERVICE_PROVIDER = 2,
    }
);

code_table!(
    /// A-ABORT reason/diag when the source is the service provider, PS3.8 Table 9-26.
    AbortReason {
        NOT_SPECIFIED = 0,
        UNRECOGNIZED_PDU = 1,
        UNEXPECTED_PDU = 2,
        UNRECOGNIZED_PDU_PARAMETER = 4,
        UNEXPECTED_PDU_PARAMETER = 5,
        INVALID_PDU_PARAMETER_VALUE = 6,
    }
);

code_table!(
    /// A-ASSOCIATE-RJ result, PS3.8 Table 9-21.
    RejectResult {
        PERMANENT = 1,
        TRANSIENT = 2,
    }
);

code_table!(
    /// A-ASSOCIATE-RJ source, PS3.8 Table 9-21.
    RejectSource {
        SERVICE_USER = 1,
        SERVICE_PROVIDER_ACSE = 2,
        SERVICE_PROVIDER_PRESENTATION = 3,
    }
);

/// A-ASSOCIATE-RJ reason/diag values, PS3.8 Table 9-21. Their meaning depends on the source, so
/// they are plain constants grouped by source.
pub mod reject_reason {
    /// Source 1 (service user).
    pub const NO_REASON_GIVEN: u8 = 1;
    pub const APPLICATION_CONTEXT_NAME_NOT_SUPPORTED: u8 = 2;
    pub const CALLING_AE_TITLE_NOT_RECOGNIZED: u8 = 3;
    pub const CALLED_AE_TITLE_NOT_RECOGNIZED: u8 = 7;
    /// Source 2 (ACSE).
    pub const PROTOCOL_VERSION_NOT_SUPPORTED: u8 = 2;
    /// Source 3 (presentation).
    pub const TEMPORARY_CONGESTION: u8 = 1;
    pub const LOCAL_LIMIT_EXCEEDED: u8 = 2;
}

/// An A-ASSOCIATE-RJ in words (PS3.8 Table 9-21), with its codes: e.g. "rejected permanently
/// by the service user: called AE title not recognized (result 1, source 1, reason 7)".
pub fn describe_reject(result: u8, source: u8, reason: u8) -> String {
    let how = match result {
        1 => "rejected permanently",
        2 => "rejected transiently",
        _ => "rejected",
    };
    let (by, why) = match (source, reason) {
        (1, 1) => ("the service user", "no reason given"),
        (1, 2) => ("the service user", "application context name not supported"),
        (1, 3) => ("the service user", "calling AE title not recognized"),
        (1, 7) => ("the service user", "called AE title not recognized"),
        (1, _) => ("the service user", "reserved reason"),
        (2, 1) => ("the service provider (ACSE)", "no reason given"),
        (2, 2) => (
            "the service provider (ACSE)",
            "protocol version not supported",
        ),
        (2, _) => ("the service provider (ACSE)", "reserved reason"),
        (3, 1) => (
            "the service provider (presentation)",
            "temporary congestion",
        ),
        (3, 2) => (
            "the service provider (presentation)",
            "local limit exceeded",
        ),
        (3, _) => ("the service provider (presentation)", "reserved reason"),
        _ => ("an unknown source", "unknown reason"),
    };
    format!("{how} by {by}: {why} (result {result}, source {source}, reason {reason})")
}

/// An A-ABORT in words (PS3.8 Table 9-26), with its codes.
pub fn describe_abort(source: u8, reason: u8) -> String {
    let text = match (source, reason) {
        (0, _) => "by the service user".to_string(),
        (2, 0) => "by the service provider: reason not specified".to_string(),
        (2, 1) => "by the service provider: unrecognized PDU".to_string(),
        (2, 2) => "by the service provider: unexpected PDU".to_string(),
        (2, 4) => "by the service provider: unrecognized PDU parameter".to_string(),
        (2, 5) => "by the service provider: unexpected PDU parameter".to_string(),
        (2, 6) => "by the service provider: invalid PDU parameter value".to_string(),
        (2, _) => "by the service provider: reserved reason".to_string(),
        _ => "from a reserved source".to_string(),
    };
    format!("{text} (source {source}, reason {reason})")
}

code_table!(
    /// Presentation context result/reason in an A-ASSOCIATE-AC, PS3.8 Table 9-18.
    PcResult {
        ACCEPTANCE = 0,
        USER_REJECTION = 1,
        NO_REASON = 2,
        ABSTRACT_SYNTAX_NOT_SUPPORTED = 3,
        TRANSFER_SYNTAXES_NOT_SUPPORTED = 4,
    }
);

/// Item types of the A-ASSOCIATE variable fields, PS3.8 §9.3.2 and Annex D.
pub mod item_type {
    pub const APPLICATION_CONTEXT: u8 = 0x10;
    pub const PRESENTATION_CONTEXT_RQ: u8 = 0x20;
    pub const PRESENTATION_CONTEXT_AC: u8 = 0x21;
    pub const ABSTRACT_SYNTAX: u8 = 0x30;
    pub const TRANSFER_SYNTAX: u8 = 0x40;
    pub const USER_INFORMATION: u8 = 0x50;
    pub const MAXIMUM_LENGTH: u8 = 0x51;
    pub const IMPLEMENTATION_CLASS_UID: u8 = 0x52;
    pub const ASYNCHRONOUS_OPERATIONS_WINDOW: u8 = 0x53;
    pub const SCP_SCU_ROLE_SELECTION: u8 = 0x54;
    pub const IMPLEMENTATION_VERSION_NAME: u8 = 0x55;
    pub const SOP_CLASS_EXTENDED_NEGOTIATION: u8 = 0x56;
    pub const SOP_CLASS_COMMON_EXTENDED_NEGOTIATION: u8 = 0x57;
    pub const USER_IDENTITY_RQ: u8 = 0x58;
    pub const USER_IDENTITY_AC: u8 = 0x59;
}

/// The DICOM application context name, PS3.7 Annex A.2.1.
pub const DICOM_APPLICATION_CONTEXT: &[u8] = b"1.2.840.10008.3.1.1.1";

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 12: rejections printed as "(result 1, source 1, reason 7)" only.
    #[test]
    fn reject_and_abort_reasons_are_in_words() {
        assert_eq!(
            describe_reject(1, 1, 7),
            "rejected permanently by the service user: called AE title not recognized \
             (result 1, source 1, reason 7)"
        );
        assert!(
            describe_reject(2, 3, 2).contains("transiently")
                && describe_reject(2, 3, 2).contains("local limit exceeded")
        );
        assert_eq!(
            describe_abort(2, 6),
            "by the service provider: invalid PDU parameter value (source 2, reason 6)"
        );
        assert!(describe_abort(0, 0).starts_with("by the service user"));
        assert!(describe_reject(9, 9, 9).contains("unknown"));
    }
}
