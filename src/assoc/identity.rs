//! User identity negotiation, acceptor side (PS3.7 D.3.3.7): the verification of a requestor's
//! User Identity sub-item (0x58) against the users of `[auth] users_file` and the verdict
//! negotiation acts on.
//!
//! Owns: the users (name and argon2 PHC hash, or `-` for "no passcode"; the file's format is
//! `config::users`'s) and a cache of successful verifications. Pure: no sockets, no clocks, no
//! files (the configuration reads and parses the file, [`Config::user_directory`] makes the
//! directory of it with a per-process key). Must never keep or log a passcode: the cache holds
//! SHA-256 digests keyed by a per-process random key.
//!
//! Cost: an argon2id verification with the parameters `dicomgate passwd` uses (argon2's
//! defaults: 19 MiB, 2 passes) takes tens of milliseconds of one core, and it runs on the
//! reactor thread that negotiates. A successful (user, passcode) is therefore cached for the
//! process lifetime (at most [`CACHE_ENTRIES`] entries, then the cache starts again), so a
//! modality that reconnects for every study pays once; a failed one is remembered the same way.
//! Every other verification takes a token from a node-wide bucket (`[auth]
//! max_verifications_per_second`, a burst of as many): when it is empty the association is
//! refused as congested ([`Verdict::Busy`]) without verifying, so wrong passcodes sent in a
//! loop cost at most that many verifications per second, whatever the number of connections.
//! An unknown user is verified against a fixed dummy hash (and takes a token), so the time of a
//! refusal does not tell whether the user exists.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Instant;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use sha2::{Digest, Sha256};

use crate::config::users::{parse_users_file, Credential, UsersFile, MAX_USERNAME};
use crate::config::{Config, ConfigError, DEFAULT_MAX_VERIFICATIONS_PER_SECOND};

/// Longest passcode we verify (bytes of the secondary field).
pub const MAX_PASSCODE: usize = 1024;
/// Successful verifications kept; when full the cache is emptied and refills.
pub const CACHE_ENTRIES: usize = 4096;
/// What an unknown user's passcode is verified against (argon2's default parameters, as
/// `dicomgate passwd` makes; the password is random and forgotten, and the result is ignored).
const DUMMY_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$m/zT/fZ7aCdgEg7OeXCWbg$2jD9eFhp9rJbKeTRzU1FFf+fbkYkvvUZeRROzlLnxOE";

/// User-Identity-Type values, PS3.7 Table D.3-14, of the types we check (3 Kerberos, 4 SAML
/// and 5 JWT are not).
pub mod identity_type {
    pub const USERNAME: u8 = 1;
    pub const USERNAME_AND_PASSCODE: u8 = 2;
}

const NANOS: u64 = 1_000_000_000;

/// The set behind `m`, emptied first when it is full.
fn lock(m: &Mutex<HashSet<[u8; 32]>>) -> std::sync::MutexGuard<'_, HashSet<[u8; 32]>> {
    let mut set = m.lock().unwrap_or_else(|e| e.into_inner());
    if set.len() >= CACHE_ENTRIES {
        set.clear();
    }
    set
}

/// A token bucket of verifications: `credit` is nanoseconds of refill, one verification costs
/// `1 s / rate`, at most one second's worth is kept (a burst of `rate`).
#[derive(Debug)]
struct Bucket {
    credit_ns: u64,
    last: Option<Instant>,
}

/// The users a node accepts, and whether an identity is required.
pub struct UserDirectory {
    users: HashMap<String, Credential>,
    required: bool,
    /// `false`: a stand-in for a users file not read yet, which refuses every association.
    loaded: bool,
    /// Verifications per second (`[auth] max_verifications_per_second`), at least 1.
    rate: u32,
    bucket: Mutex<Bucket>,
    key: [u8; 32],
    // Invariant: holds only digests of (username, passcode) pairs that verified.
    cache: Mutex<HashSet<[u8; 32]>>,
    // Invariant: holds only digests of pairs that failed (the users do not change while the
    // process runs, so they fail again): a requestor retrying a stale passcode in a loop costs
    // one verification, not one per attempt.
    failed: Mutex<HashSet<[u8; 32]>>,
    /// argon2 verifications run (cache misses), for tests and the curious.
    verifications: std::sync::atomic::AtomicU64,
    /// What an unknown user's passcode is verified against (the result ignored): the costliest
    /// listed hash, so that a refusal takes as long as one for the slowest listed user and
    /// timing does not tell who is listed; [`DUMMY_HASH`] when none is.
    dummy: String,
}

/// The work an argon2 PHC string asks for (m × t × p), 0 if it does not parse.
fn cost(phc: &str) -> u64 {
    PasswordHash::new(phc).map_or(0, |h| {
        ["m", "t", "p"]
            .iter()
            .map(|k| u64::from(h.params.get_decimal(*k).unwrap_or(1)))
            .product()
    })
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
    /// Not verified: the node's verifications per second are spent. Refused with
    /// A-ASSOCIATE-RJ (2, 3, 1), transient, temporary congestion: the requestor may retry.
    Busy { why: String },
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
    /// Parses a users file ([`parse_users_file`]) and makes the directory of its users.
    /// `key`: random bytes of this process (cache digests). Errors name the line.
    pub fn parse(text: &str, required: bool, key: [u8; 32]) -> Result<UserDirectory, String> {
        Ok(UserDirectory::new(
            parse_users_file(text, required)?,
            required,
            key,
        ))
    }

    /// The directory of a parsed users file's users. `key`: random bytes of this process
    /// (cache digests).
    pub fn new(file: UsersFile, required: bool, key: [u8; 32]) -> UserDirectory {
        let users = file.users;
        let dummy = users
            .values()
            .filter_map(|c| match c {
                Credential::Hash(h) => Some(h),
                Credential::NoPasscode => None,
            })
            .max_by_key(|h| cost(h))
            .filter(|h| cost(h) > cost(DUMMY_HASH))
            .cloned()
            .unwrap_or_else(|| DUMMY_HASH.to_string());
        UserDirectory {
            users,
            required,
            loaded: true,
            dummy,
            rate: DEFAULT_MAX_VERIFICATIONS_PER_SECOND,
            bucket: Mutex::new(Bucket {
                credit_ns: NANOS,
                last: None,
            }),
            key,
            cache: Mutex::new(HashSet::new()),
            failed: Mutex::new(HashSet::new()),
            verifications: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// A stand-in for `[auth] required = true` whose users file is not read yet: refuses every
    /// association ("fail closed"), verifying nothing.
    pub fn not_loaded() -> UserDirectory {
        let mut d = UserDirectory::new(UsersFile::default(), true, [0; 32]);
        d.loaded = false;
        d
    }

    /// At most `n` verifications per second node-wide (a burst of `n`); `n` is at least 1.
    pub fn with_max_verifications_per_second(mut self, n: u32) -> UserDirectory {
        self.rate = n.max(1);
        self
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

    /// Takes one verification's token from the bucket at `now`, or says it is empty.
    fn take_token(&self, now: Instant) -> bool {
        let mut b = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        // Reactors pass their own `now`: one a little behind the last adds nothing.
        let elapsed = b.last.map_or(0, |l| {
            u64::try_from(now.saturating_duration_since(l).as_nanos()).unwrap_or(u64::MAX)
        });
        if b.last.is_none_or(|l| now > l) {
            b.last = Some(now);
        }
        b.credit_ns = b.credit_ns.saturating_add(elapsed).min(NANOS);
        let cost = NANOS / u64::from(self.rate);
        if b.credit_ns < cost {
            return false;
        }
        b.credit_ns -= cost;
        true
    }

    /// `Some(ok)` from the caches or one verification; `None` when the bucket is empty.
    fn verify_cached(&self, user: &str, passcode: &[u8], phc: &str, now: Instant) -> Option<bool> {
        let d = self.digest(user, passcode);
        if lock(&self.cache).contains(&d) {
            return Some(true);
        }
        if lock(&self.failed).contains(&d) {
            return Some(false);
        }
        if !self.take_token(now) {
            return None;
        }
        // Not under a lock: other reactors go on while this one verifies.
        self.verifications
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ok = verify_password(passcode, phc);
        lock(if ok { &self.cache } else { &self.failed }).insert(d);
        Some(ok)
    }

    /// The verdict on an A-ASSOCIATE-RQ's User Identity sub-item (the first, if several; the
    /// standard allows one), or on its absence, at `now` (for the verifications' rate).
    pub fn check(&self, rq: Option<IdentityRq<'_>>, now: Instant) -> Verdict {
        use identity_type as t;
        let refuse = |why: String| Verdict::Refused { why };
        if !self.loaded {
            return refuse("[auth] required = true and the users file is not loaded".into());
        }
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
        let busy = || {
            Verdict::Busy {
            why: format!(
                "user {user:?} not verified: more than {} verifications per second ([auth] max_verifications_per_second)",
                self.rate
            ),
        }
        };
        let Some(cred) = self.users.get(user) else {
            // As long as a listed user's wrong passcode takes (PS3.7 gives the requestor the
            // same A-ASSOCIATE-RJ): the time of the refusal does not say the user is unknown.
            let verifies =
                rq.identity_type == t::USERNAME_AND_PASSCODE && rq.secondary.len() <= MAX_PASSCODE;
            if verifies
                && self
                    .verify_cached(user, rq.secondary, &self.dummy, now)
                    .is_none()
            {
                return busy();
            }
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
            (Credential::Hash(phc), _) => match self.verify_cached(user, rq.secondary, phc, now) {
                Some(ok) => ok,
                None => return busy(),
            },
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

impl Config {
    /// The `[auth] users_file`'s users as the acceptor checks them (read and parsed by
    /// [`Config::users_file`], with a fresh per-process key); `None` without one. Errors name
    /// the field.
    pub fn user_directory(&self) -> Result<Option<std::sync::Arc<UserDirectory>>, ConfigError> {
        let Some(file) = self.users_file()? else {
            return Ok(None);
        };
        let key = crate::config::random_key();
        let dir = UserDirectory::new(file, self.auth.required, key)
            .with_max_verifications_per_second(self.auth.max_verifications_per_second);
        Ok(Some(std::sync::Arc::new(dir)))
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
        let now = Instant::now();
        let hash = hash_password(b"s3cret", &[7u8; 16]).unwrap();
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        let text = format!("# users\nalice:{hash}\n\nscanner:-\n");
        let dir = UserDirectory::parse(&text, true, [1; 32]).unwrap();
        assert_eq!(dir.users.len(), 2);
        let t = std::time::Instant::now();
        assert_eq!(
            dir.check(rq(2, 1, b"alice", b"s3cret"), now),
            Verdict::Accepted {
                user: "alice".into(),
                respond: true
            }
        );
        // `cargo test --lib identity -- --nocapture` shows it (argon2 is optimized in dev too).
        eprintln!(
            "one argon2id verification (m=19456 KiB, t=2, p=1): {:?}",
            t.elapsed()
        );
        assert_eq!(
            dir.check(rq(2, 0, b"alice", b"s3cret"), now),
            Verdict::Accepted {
                user: "alice".into(),
                respond: false
            }
        );
        assert_eq!(dir.verifications(), 1, "the second one is cached");
        // A passcode that is no word of the refusal, so its absence from `why` means something.
        let why = refused(dir.check(rq(2, 1, b"alice", b"zq9x"), now));
        assert_eq!(dir.verifications(), 2);
        refused(dir.check(rq(2, 1, b"alice", b"zq9x"), now));
        assert_eq!(
            dir.verifications(),
            2,
            "the same wrong one again is remembered"
        );
        refused(dir.check(rq(2, 1, b"alice", b"zq9y"), now));
        assert_eq!(dir.verifications(), 3, "a different one is verified");
        assert!(
            why.contains("wrong passcode") && why.contains("alice") && !why.contains("zq9x"),
            "{why}"
        );
        assert!(refused(dir.check(rq(1, 0, b"alice", b""), now)).contains("no passcode"));
        assert!(matches!(
            dir.check(rq(1, 1, b"scanner", b""), now),
            Verdict::Accepted { respond: true, .. }
        ));
        assert!(refused(dir.check(rq(2, 0, b"mallory", b"x"), now)).contains("unknown user"));
        assert!(refused(dir.check(None, now)).contains("no user identity"));
        for ty in [3, 4, 5, 9] {
            assert!(refused(dir.check(rq(ty, 0, b"ticket", b""), now)).contains("type"));
        }
        assert!(
            refused(dir.check(rq(2, 0, &[b'a'; MAX_USERNAME + 1], b"x"), now)).contains("bytes")
        );
        assert!(
            refused(dir.check(rq(2, 0, b"alice", &[0; MAX_PASSCODE + 1]), now)).contains("longer")
        );
        assert!(refused(dir.check(rq(2, 0, b"", b""), now)).contains("0 bytes"));
        assert!(refused(dir.check(rq(2, 0, b"\xff\xfe", b"x"), now)).contains("UTF-8"));
        // Not required: absent or other types go on anonymously; a wrong passcode still fails.
        let open = UserDirectory::parse(&text, false, [1; 32]).unwrap();
        assert_eq!(open.check(None, now), Verdict::Anonymous);
        assert_eq!(
            open.check(rq(3, 1, b"ticket", b""), now),
            Verdict::Anonymous
        );
        assert!(refused(open.check(rq(2, 0, b"alice", b"nope"), now)).contains("wrong passcode"));
        // A debug print holds no hash.
        assert!(!format!("{dir:?}").contains("argon2"));
    }

    /// Review of issue 13: wrong passcodes sent by many connections each cost a verification,
    /// without a bound on their rate. Now at most `max_verifications_per_second` (a burst of as
    /// many), refused as congested beyond it; cached successes and remembered failures take no
    /// token; the bucket refills with the `now` passed in.
    #[test]
    fn verifications_are_rate_limited_node_wide() {
        let t0 = Instant::now();
        let hash = hash_password(b"s3cret", &[7u8; 16]).unwrap();
        let dir = UserDirectory::parse(&format!("alice:{hash}\n"), true, [1; 32])
            .unwrap()
            .with_max_verifications_per_second(3);
        assert!(matches!(
            dir.check(rq(2, 0, b"alice", b"s3cret"), t0),
            Verdict::Accepted { .. }
        ));
        refused(dir.check(rq(2, 0, b"alice", b"zq9a"), t0));
        refused(dir.check(rq(2, 0, b"alice", b"zq9b"), t0));
        assert_eq!(dir.verifications(), 3);
        let busy = dir.check(rq(2, 0, b"alice", b"zq9c"), t0);
        assert!(
            matches!(&busy, Verdict::Busy { why } if why.contains("max_verifications_per_second") && !why.contains("zq9c")),
            "{busy:?}"
        );
        assert_eq!(dir.verifications(), 3, "an empty bucket verifies nothing");
        // Cached: no token needed.
        assert!(matches!(
            dir.check(rq(2, 0, b"alice", b"s3cret"), t0),
            Verdict::Accepted { .. }
        ));
        refused(dir.check(rq(2, 0, b"alice", b"zq9a"), t0));
        // An unknown user takes a token too (its dummy verification).
        assert!(matches!(
            dir.check(rq(2, 0, b"mallory", b"zq9d"), t0),
            Verdict::Busy { .. }
        ));
        // A third of a second later, one more; a second later a full burst, never more.
        let t1 = t0 + std::time::Duration::from_millis(334);
        refused(dir.check(rq(2, 0, b"alice", b"zq9c"), t1));
        assert!(matches!(
            dir.check(rq(2, 0, b"alice", b"zq9e"), t1),
            Verdict::Busy { .. }
        ));
        // A reactor whose `now` is a little behind adds nothing and breaks nothing.
        assert!(matches!(
            dir.check(rq(2, 0, b"alice", b"zq9e"), t0),
            Verdict::Busy { .. }
        ));
        let t2 = t1 + std::time::Duration::from_secs(60);
        for p in [b"zq9f", b"zq9g", b"zq9h"] {
            refused(dir.check(rq(2, 0, b"alice", p), t2));
        }
        assert!(matches!(
            dir.check(rq(2, 0, b"alice", b"zq9i"), t2),
            Verdict::Busy { .. }
        ));
        assert_eq!(dir.verifications(), 7);
    }

    /// Review of issue 13: an unknown user was refused in microseconds, a listed one after a
    /// verification, so the time told who exists. An unknown user's passcode is now verified
    /// against a dummy hash (counted like any verification).
    #[test]
    fn unknown_users_cost_a_verification_like_listed_ones() {
        let now = Instant::now();
        let hash = hash_password(b"s3cret", &[7u8; 16]).unwrap();
        let dir = UserDirectory::parse(&format!("alice:{hash}\n"), true, [1; 32]).unwrap();
        assert!(refused(dir.check(rq(2, 0, b"alice", b"zq9x"), now)).contains("wrong passcode"));
        assert_eq!(dir.verifications(), 1);
        assert!(refused(dir.check(rq(2, 0, b"mallory", b"zq9x"), now)).contains("unknown user"));
        assert_eq!(dir.verifications(), 2, "the unknown user was verified too");
        refused(dir.check(rq(2, 0, b"mallory", b"zq9x"), now));
        assert_eq!(
            dir.verifications(),
            2,
            "and remembered like a listed user's"
        );
        // The dummy hash parses, and a passcode tried against it does not verify (the result is
        // ignored anyway: an unknown user is always refused).
        assert!(!verify_password(b"zq9x", DUMMY_HASH));
        assert!(PasswordHash::new(DUMMY_HASH).is_ok());
    }

    /// Review of issue 13: an unknown user was verified against a hash of argon2's default
    /// cost, so with costlier listed hashes a refusal still told who is listed; the dummy is
    /// the costliest listed hash.
    #[test]
    fn unknown_users_are_verified_against_the_costliest_listed_hash() {
        use argon2::{Algorithm, Params, Version};
        let strong = Argon2::new(
            Algorithm::Argon2id,
            Version::V0x13,
            Params::new(32 * 1024, 3, 1, None).unwrap(),
        );
        let salt = SaltString::encode_b64(&[7u8; 16]).unwrap();
        let phc = strong.hash_password(b"s3cret", &salt).unwrap().to_string();
        let weak = hash_password(b"other", &[9u8; 16]).unwrap();
        let d = UserDirectory::parse(&format!("alice:{phc}\nbob:{weak}\n"), true, [1; 32]).unwrap();
        assert_eq!(d.dummy, phc);
        assert!(cost(&d.dummy) > cost(DUMMY_HASH));
        let d = UserDirectory::parse(&format!("bob:{weak}\n"), true, [1; 32]).unwrap();
        assert_eq!(cost(&d.dummy), cost(DUMMY_HASH));
    }

    /// Review of issue 13: a policy made with `required = true` before the users file is
    /// loaded refuses every association, verifying nothing.
    #[test]
    fn a_directory_not_loaded_refuses_everything() {
        let now = Instant::now();
        let d = UserDirectory::not_loaded();
        assert!(d.required);
        for v in [
            d.check(None, now),
            d.check(rq(1, 0, b"scanner", b""), now),
            d.check(rq(2, 0, b"alice", b"x"), now),
            d.check(rq(3, 0, b"t", b""), now),
        ] {
            assert!(refused(v).contains("not loaded"));
        }
        assert_eq!(d.verifications(), 0);
    }
}
