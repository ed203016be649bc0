//! User identity negotiation, acceptor side (PS3.7 D.3.3.7): the users file, the verification
//! of a requestor's User Identity sub-item (0x58) and the verdict negotiation acts on.
//!
//! Owns: the users (name and argon2 PHC hash, or `-` for "no passcode") and a cache of
//! successful verifications. Pure: no sockets, no clocks, no files (the host reads the file and
//! hands its text and a per-process key to [`UserDirectory::parse`]). Must never keep or log a
//! passcode: the cache holds SHA-256 digests keyed by a per-process random key.
//!
//! Cost: an argon2id verification with the parameters `dicomgate passwd` uses (argon2's
//! defaults: 19 MiB, 2 passes) takes tens of milliseconds of one core, and it runs on the
//! reactor thread that negotiates. A successful (user, passcode) is therefore cached for the
//! process lifetime (at most [`CACHE_ENTRIES`] entries, then the cache starts again), so a
//! modality that reconnects for every study pays once; a failed one is never cached, so each
//! wrong passcode costs one verification (bounded per connection by ARTIM and the connection
//! limits; per-address limits are another item of issue 13).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use sha2::{Digest, Sha256};

/// Longest username we look up (bytes of the primary field); longer ones are refused before
/// any work. The sub-item's own bound is its u16 length, and the whole A-ASSOCIATE-RQ's is
/// `[limits] max_associate_length`.
pub const MAX_USERNAME: usize = 256;
/// Longest passcode we verify (bytes of the secondary field).
pub const MAX_PASSCODE: usize = 1024;
/// Successful verifications kept; when full the cache is emptied and refills.
pub const CACHE_ENTRIES: usize = 4096;
/// Bounds on the argon2 parameters a users file may name (a hash asking for more memory or
/// passes than this is refused at start-up: every verification would pay it).
const MAX_M_COST_KIB: u32 = 256 * 1024;
const MAX_T_COST: u32 = 16;
const MAX_P_COST: u32 = 8;

/// User-Identity-Type values, PS3.7 Table D.3-14.
pub mod identity_type {
    pub const USERNAME: u8 = 1;
    pub const USERNAME_AND_PASSCODE: u8 = 2;
    pub const KERBEROS: u8 = 3;
    pub const SAML: u8 = 4;
    pub const JWT: u8 = 5;
}

#[derive(Clone)]
enum Credential {
    /// Listed with `-`: the username alone identifies (type 1, or type 2 whose passcode is not
    /// looked at).
    NoPasscode,
    /// An argon2 PHC string, checked to parse at load time.
    Hash(String),
}

/// The set behind `m`, emptied first when it is full.
fn lock(m: &Mutex<HashSet<[u8; 32]>>) -> std::sync::MutexGuard<'_, HashSet<[u8; 32]>> {
    let mut set = m.lock().unwrap_or_else(|e| e.into_inner());
    if set.len() >= CACHE_ENTRIES {
        set.clear();
    }
    set
}

/// The users a node accepts, and whether an identity is required.
pub struct UserDirectory {
    users: HashMap<String, Credential>,
    required: bool,
    key: [u8; 32],
    // Invariant: holds only digests of (username, passcode) pairs that verified.
    cache: Mutex<HashSet<[u8; 32]>>,
    // Invariant: holds only digests of pairs that failed (the users do not change while the
    // process runs, so they fail again): a requestor retrying a stale passcode in a loop costs
    // one verification, not one per attempt.
    failed: Mutex<HashSet<[u8; 32]>>,
    /// argon2 verifications run (cache misses), for tests and the curious.
    verifications: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for UserDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the hashes.
        f.debug_struct("UserDirectory")
            .field("users", &self.users.len())
            .field("required", &self.required)
            .finish_non_exhaustive()
    }
}

/// What negotiation does with the requestor's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Verified: the association goes on; `respond` = send the User Identity server response
    /// sub-item (0x59) in the A-ASSOCIATE-AC.
    Accepted { user: String, respond: bool },
    /// No identity, or one of a type we do not check, and none is required: goes on without a
    /// server response.
    Anonymous,
    /// Refused with A-ASSOCIATE-RJ (1, 1, 1); `why` names the user (never the passcode).
    Refused { why: String },
}

/// The identity sub-item's fields as received.
#[derive(Debug, Clone, Copy)]
pub struct IdentityRq<'a> {
    pub identity_type: u8,
    pub positive_response_requested: u8,
    pub primary: &'a [u8],
    pub secondary: &'a [u8],
}

/// A line's hash for `password`: argon2id with argon2's default parameters, in the PHC string
/// format. `salt` must be at least 16 random bytes.
pub fn hash_password(password: &[u8], salt: &[u8]) -> Result<String, String> {
    let salt = SaltString::encode_b64(salt).map_err(|e| format!("salt: {e}"))?;
    Argon2::default()
        .hash_password(password, &salt)
        .map(|h| h.to_string())
        .map_err(|e| format!("argon2: {e}"))
}

/// One successful argon2 verification of `password` against `phc`.
pub fn verify_password(password: &[u8], phc: &str) -> bool {
    PasswordHash::new(phc).is_ok_and(|h| Argon2::default().verify_password(password, &h).is_ok())
}

impl UserDirectory {
    /// Parses a users file: one `username:hash` per line, `hash` an argon2 PHC string made by
    /// `dicomgate passwd` or `-` (no passcode); blank lines and lines starting with `#` are
    /// skipped. `key`: random bytes of this process (cache digests). Errors name the line.
    pub fn parse(text: &str, required: bool, key: [u8; 32]) -> Result<UserDirectory, String> {
        let mut users = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() || line.trim_start().starts_with('#') {
                continue;
            }
            let Some((user, hash)) = line.split_once(':') else {
                return Err(format!("line {n}: not username:hash"));
            };
            if user.is_empty() || user.len() > MAX_USERNAME || user.chars().any(char::is_control) {
                return Err(format!(
                    "line {n}: the username must be 1 to {MAX_USERNAME} bytes, no control characters"
                ));
            }
            let cred = if hash == "-" {
                Credential::NoPasscode
            } else {
                let h = PasswordHash::new(hash).map_err(|e| {
                    format!("line {n} (user {user:?}): not an argon2 PHC string ({e}): make it with `dicomgate passwd`")
                })?;
                if !h.algorithm.as_str().starts_with("argon2") {
                    return Err(format!("line {n} (user {user:?}): not an argon2 hash"));
                }
                let p = argon2::Params::try_from(&h)
                    .map_err(|e| format!("line {n} (user {user:?}): argon2 parameters: {e}"))?;
                if p.m_cost() > MAX_M_COST_KIB || p.t_cost() > MAX_T_COST || p.p_cost() > MAX_P_COST
                {
                    return Err(format!(
                        "line {n} (user {user:?}): argon2 parameters above m={MAX_M_COST_KIB}, t={MAX_T_COST}, p={MAX_P_COST}"
                    ));
                }
                Credential::Hash(hash.to_string())
            };
            if users.insert(user.to_string(), cred).is_some() {
                return Err(format!("line {n}: user {user:?} is listed twice"));
            }
        }
        Ok(UserDirectory {
            users,
            required,
            key,
            cache: Mutex::new(HashSet::new()),
            failed: Mutex::new(HashSet::new()),
            verifications: std::sync::atomic::AtomicU64::new(0),
        })
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    pub fn required(&self) -> bool {
        self.required
    }

    /// How many argon2 verifications ran (each cache miss).
    pub fn verifications(&self) -> u64 {
        self.verifications
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn digest(&self, user: &str, passcode: &[u8]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.key);
        h.update((user.len() as u64).to_be_bytes());
        h.update(user.as_bytes());
        h.update(passcode);
        h.finalize().into()
    }

    fn verify_cached(&self, user: &str, passcode: &[u8], phc: &str) -> bool {
        let d = self.digest(user, passcode);
        if lock(&self.cache).contains(&d) {
            return true;
        }
        if lock(&self.failed).contains(&d) {
            return false;
        }
        // Not under a lock: other reactors go on while this one verifies.
        self.verifications
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ok = verify_password(passcode, phc);
        lock(if ok { &self.cache } else { &self.failed }).insert(d);
        ok
    }

    /// The verdict on an A-ASSOCIATE-RQ's User Identity sub-item (the first, if several; the
    /// standard allows one), or on its absence.
    pub fn check(&self, rq: Option<IdentityRq<'_>>) -> Verdict {
        use identity_type as t;
        let refuse = |why: String| Verdict::Refused { why };
        let Some(rq) = rq else {
            return if self.required {
                refuse("no user identity, and [auth] required = true".into())
            } else {
                Verdict::Anonymous
            };
        };
        if rq.identity_type != t::USERNAME && rq.identity_type != t::USERNAME_AND_PASSCODE {
            return if self.required {
                refuse(format!(
                    "user identity type {} (only 1, username, and 2, username and passcode, are checked)",
                    rq.identity_type
                ))
            } else {
                Verdict::Anonymous
            };
        }
        let shown = String::from_utf8_lossy(&rq.primary[..rq.primary.len().min(64)]).into_owned();
        if rq.primary.is_empty() || rq.primary.len() > MAX_USERNAME {
            return refuse(format!(
                "username of {} bytes (1 to {MAX_USERNAME})",
                rq.primary.len()
            ));
        }
        let Ok(user) = std::str::from_utf8(rq.primary) else {
            return refuse(format!("username {shown:?} is not UTF-8"));
        };
        let Some(cred) = self.users.get(user) else {
            return refuse(format!("unknown user {user:?}"));
        };
        let ok = match (cred, rq.identity_type) {
            (Credential::NoPasscode, _) => true,
            (Credential::Hash(_), t::USERNAME) => {
                return refuse(format!(
                    "user {user:?} sent no passcode (type 1), and has one"
                ))
            }
            (Credential::Hash(_), _) if rq.secondary.len() > MAX_PASSCODE => {
                return refuse(format!(
                    "user {user:?}: passcode longer than {MAX_PASSCODE} bytes"
                ))
            }
            (Credential::Hash(phc), _) => self.verify_cached(user, rq.secondary, phc),
        };
        if ok {
            Verdict::Accepted {
                user: user.to_string(),
                respond: rq.positive_response_requested == 1,
            }
        } else {
            refuse(format!("wrong passcode for user {user:?}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rq<'a>(t: u8, pos: u8, p: &'a [u8], s: &'a [u8]) -> Option<IdentityRq<'a>> {
        Some(IdentityRq {
            identity_type: t,
            positive_response_requested: pos,
            primary: p,
            secondary: s,
        })
    }

    fn refused(v: Verdict) -> String {
        match v {
            Verdict::Refused { why } => why,
            v => panic!("not refused: {v:?}"),
        }
    }

    #[test]
    fn users_file_verification_types_and_refusals() {
        let hash = hash_password(b"s3cret", &[7u8; 16]).unwrap();
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        let text = format!("# users\nalice:{hash}\n\nscanner:-\n");
        let dir = UserDirectory::parse(&text, true, [1; 32]).unwrap();
        assert_eq!(dir.len(), 2);
        let t = std::time::Instant::now();
        assert_eq!(
            dir.check(rq(2, 1, b"alice", b"s3cret")),
            Verdict::Accepted {
                user: "alice".into(),
                respond: true
            }
        );
        let first = t.elapsed();
        // `cargo test --lib identity -- --nocapture` shows it (argon2 is optimized in dev too).
        eprintln!("one argon2id verification (m=19456 KiB, t=2, p=1): {first:?}");
        let t = std::time::Instant::now();
        assert_eq!(
            dir.check(rq(2, 0, b"alice", b"s3cret")),
            Verdict::Accepted {
                user: "alice".into(),
                respond: false
            }
        );
        assert!(t.elapsed() < first, "the second one is cached");
        assert_eq!(dir.verifications(), 1, "the second one is cached");
        let why = refused(dir.check(rq(2, 1, b"alice", b"wrong")));
        assert_eq!(dir.verifications(), 2);
        refused(dir.check(rq(2, 1, b"alice", b"wrong")));
        assert_eq!(
            dir.verifications(),
            2,
            "the same wrong one again is remembered"
        );
        refused(dir.check(rq(2, 1, b"alice", b"wrong2")));
        assert_eq!(dir.verifications(), 3, "a different one is verified");
        assert!(
            why.contains("wrong passcode") && why.contains("alice") && !why.contains("wrong\""),
            "{why}"
        );
        assert!(refused(dir.check(rq(1, 0, b"alice", b""))).contains("no passcode"));
        assert!(matches!(
            dir.check(rq(1, 1, b"scanner", b"")),
            Verdict::Accepted { respond: true, .. }
        ));
        assert!(refused(dir.check(rq(2, 0, b"mallory", b"x"))).contains("unknown user"));
        assert!(refused(dir.check(None)).contains("no user identity"));
        for ty in [3, 4, 5, 9] {
            assert!(refused(dir.check(rq(ty, 0, b"ticket", b""))).contains("type"));
        }
        assert!(refused(dir.check(rq(2, 0, &[b'a'; MAX_USERNAME + 1], b"x"))).contains("bytes"));
        assert!(refused(dir.check(rq(2, 0, b"alice", &[0; MAX_PASSCODE + 1]))).contains("longer"));
        assert!(refused(dir.check(rq(2, 0, b"", b""))).contains("0 bytes"));
        assert!(refused(dir.check(rq(2, 0, b"\xff\xfe", b"x"))).contains("UTF-8"));
        // Not required: absent or other types go on anonymously; a wrong passcode still fails.
        let open = UserDirectory::parse(&text, false, [1; 32]).unwrap();
        assert_eq!(open.check(None), Verdict::Anonymous);
        assert_eq!(open.check(rq(3, 1, b"ticket", b"")), Verdict::Anonymous);
        assert!(refused(open.check(rq(2, 0, b"alice", b"nope"))).contains("wrong passcode"));
        // A debug print holds no hash.
        assert!(!format!("{dir:?}").contains("argon2"));
    }

    #[test]
    fn bad_users_files_name_the_line() {
        for (text, want) in [
            ("alice\n", "line 1: not username:hash"),
            (
                "#x\nalice:plain\n",
                "line 2 (user \"alice\"): not an argon2 PHC",
            ),
            ("a:-\na:-\n", "line 2: user \"a\" is listed twice"),
            (":-\n", "line 1: the username"),
        ] {
            let e = UserDirectory::parse(text, false, [0; 32]).unwrap_err();
            assert!(e.contains(want), "{text:?}: {e}");
        }
        // A hash demanding 1 GiB per verification is refused.
        let e = UserDirectory::parse(
            "a:$argon2id$v=19$m=1048576,t=2,p=1$c2FsdHNhbHRzYWx0$ZmFrZWhhc2hmYWtlaGFzaGZha2VoYXNo\n",
            false,
            [0; 32],
        )
        .unwrap_err();
        assert!(e.contains("parameters above"), "{e}");
    }
}
