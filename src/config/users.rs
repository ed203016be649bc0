//! `[auth] users_file` as plain data: the file's `username:hash` lines, parsed and checked at
//! start-up (by `Config::check_environment`, with the line of each error), the warnings about
//! it (`Config::warnings`), and the users the acceptor's identity check
//! (`assoc::identity::UserDirectory`) is made from. Owns the file's format; no I/O (the caller
//! reads the file), never a passcode.

use std::collections::HashMap;

use argon2::password_hash::PasswordHash;

/// Longest username we look up (bytes of the primary field); longer ones are refused before
/// any work. The sub-item's own bound is its u16 length, and the whole A-ASSOCIATE-RQ's is
/// `[limits] max_associate_length`.
pub const MAX_USERNAME: usize = 256;
/// Bounds on the argon2 parameters a users file may name (a hash asking for more memory or
/// passes than this is refused at start-up: every verification would pay it).
pub const MAX_M_COST_KIB: u32 = 64 * 1024;
pub const MAX_T_COST: u32 = 4;
pub const MAX_P_COST: u32 = 4;
/// OWASP's minimum for argon2id (19 MiB, 2 passes): a hash below it is warned about.
pub const MIN_M_COST_KIB: u32 = 19 * 1024;
pub const MIN_T_COST: u32 = 2;

/// The users of a users file and the warnings about it.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct UsersFile {
    pub users: HashMap<String, Credential>,
    /// Start-up warnings (weak hashes, username-only users when required), each naming its
    /// line.
    pub notes: Vec<String>,
}

impl std::fmt::Debug for UsersFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the hashes.
        f.debug_struct("UsersFile")
            .field("users", &self.users.len())
            .field("notes", &self.notes)
            .finish()
    }
}

/// How a listed user identifies.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// Listed with `-`: the username alone identifies (type 1, or type 2 whose passcode is not
    /// looked at).
    NoPasscode,
    /// An argon2 PHC string, checked to parse at load time.
    Hash(String),
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the hash.
        f.write_str(match self {
            Credential::NoPasscode => "NoPasscode",
            Credential::Hash(_) => "Hash(..)",
        })
    }
}

/// Parses a users file: one `username:hash` per line, `hash` an argon2 PHC string made by
/// `dicomgate passwd` or `-` (no passcode); blank lines and lines starting with `#` are
/// skipped. `required` (`[auth] required`) adds a warning for each username-only user. Errors
/// name the line.
pub fn parse_users_file(text: &str, required: bool) -> Result<UsersFile, String> {
    let mut users = HashMap::new();
    let mut notes = Vec::new();
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
            if p.m_cost() > MAX_M_COST_KIB || p.t_cost() > MAX_T_COST || p.p_cost() > MAX_P_COST {
                return Err(format!(
                    "line {n} (user {user:?}): argon2 parameters m={}, t={}, p={} above m={MAX_M_COST_KIB}, t={MAX_T_COST}, p={MAX_P_COST}",
                    p.m_cost(), p.t_cost(), p.p_cost()
                ));
            }
            if p.m_cost() < MIN_M_COST_KIB || p.t_cost() < MIN_T_COST {
                notes.push(format!(
                    "line {n} (user {user:?}): argon2 parameters m={}, t={} below OWASP's minimum \
                     (m={MIN_M_COST_KIB}, t={MIN_T_COST}): make it again with `dicomgate passwd`",
                    p.m_cost(),
                    p.t_cost()
                ));
            }
            Credential::Hash(hash.to_string())
        };
        if required && matches!(cred, Credential::NoPasscode) {
            notes.push(format!(
                "line {n} (user {user:?}): listed with `-` (username only) while required = \
                 true: the username is no secret (it travels in clear and is logged), anyone \
                 who sends it is accepted"
            ));
        }
        if users.insert(user.to_string(), cred).is_some() {
            return Err(format!("line {n}: user {user:?} is listed twice"));
        }
    }
    Ok(UsersFile { users, notes })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review of issue 13: the caps on a users file's argon2 cost were m 256 MiB, t 16, p 8;
    /// now m 64 MiB, t 4, p 4, refused naming the line; hashes below OWASP's minimum
    /// (m 19 MiB, t 2) and username-only users when required are warned about.
    #[test]
    fn argon2_costs_above_64_mib_or_4_passes_are_refused() {
        let line = |m: u32, t: u32, p: u32| {
            format!("a:$argon2id$v=19$m={m},t={t},p={p}$c2FsdHNhbHRzYWx0$ZmFrZWhhc2hmYWtlaGFzaGZha2VoYXNo\n")
        };
        for (m, t, p) in [(65537, 2, 1), (19456, 5, 1), (19456, 2, 5), (131072, 2, 1)] {
            let e = parse_users_file(&format!("#\n{}", line(m, t, p)), false).unwrap_err();
            assert!(
                e.contains("line 2 (user \"a\")") && e.contains("above m=65536, t=4, p=4"),
                "{e}"
            );
        }
        let ok = parse_users_file(&line(65536, 4, 4), false).unwrap();
        assert!(ok.notes.is_empty(), "{:?}", ok.notes);
        let weak = parse_users_file(&line(4096, 1, 1), false).unwrap();
        assert!(
            weak.notes.len() == 1 && weak.notes[0].contains("below OWASP"),
            "{:?}",
            weak.notes
        );
        let open = parse_users_file("scanner:-\n", false).unwrap();
        assert!(open.notes.is_empty());
        let required = parse_users_file("scanner:-\n", true).unwrap();
        assert!(
            required.notes.len() == 1
                && required.notes[0].contains("line 1 (user \"scanner\")")
                && required.notes[0].contains("no secret"),
            "{:?}",
            required.notes
        );
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
            let e = parse_users_file(text, false).unwrap_err();
            assert!(e.contains(want), "{text:?}: {e}");
        }
        // A hash demanding 1 GiB per verification is refused.
        let e = parse_users_file(
            "a:$argon2id$v=19$m=1048576,t=2,p=1$c2FsdHNhbHRzYWx0$ZmFrZWhhc2hmYWtlaGFzaGZha2VoYXNo\n",
            false,
        )
        .unwrap_err();
        assert!(e.contains("parameters"), "{e}");
    }
}
