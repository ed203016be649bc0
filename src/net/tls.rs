//! DICOM over TLS (PS3.15 Annex B.12, the BCP 195 profile): the rustls configuration of the
//! node's TLS listener and of a TLS requestor, built from PEM files, and the sans-IO glue that
//! puts a rustls session between a reactor's non-blocking socket and the bytes the association
//! reads and writes.
//!
//! Owns: loading and checking the certificate, key and CA files (each error names its config
//! field); the protocol versions and cipher suites; moving TLS records between a socket and a
//! [`rustls::ServerConnection`]. Must never: block, buffer without bound (rustls bounds its
//! own buffers: received plaintext and unsent records, see [`BUFFER_LIMIT`]), or panic on a
//! peer's bytes (a bad record is a TLS alert and a closed connection).
//!
//! The profile (PS3.15 B.12, BCP 195 / RFC 9325): TLS 1.2 and 1.3 only; key exchange ECDHE
//! only (rustls's X25519, P-256, P-384); bulk ciphers AEAD only:
//! - TLS 1.3: TLS_AES_128_GCM_SHA256, TLS_AES_256_GCM_SHA384, TLS_CHACHA20_POLY1305_SHA256;
//! - TLS 1.2: TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
//!   TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256, TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384.
//!
//! Nothing weaker is offered: no CBC, no RSA key exchange, no TLS 1.2 ChaCha20 (rustls's own
//! defaults would add the last; BCP 195 allows it, the profile does not ask for it).

use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::Arc;

use rustls::crypto::ring as provider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{RootCertStore, ServerConfig, ServerConnection};

use crate::config::TlsConfig;

/// Unsent TLS records (and plaintext written before the handshake completed) one connection
/// may hold in rustls; past it the association's own output waits in its service, as it does
/// for a plain socket. Received plaintext is bounded by rustls itself (16 KiB); during the
/// handshake rustls may also hold a handshake message being reassembled (up to ~64 KiB) and
/// its record buffer (~18 KiB), for at most ARTIM (README, "TLS").
pub const BUFFER_LIMIT: usize = 64 * 1024;

/// The crypto provider restricted to the PS3.15 B.12 / BCP 195 suites listed in the module doc.
pub fn profile_provider() -> rustls::crypto::CryptoProvider {
    use provider::cipher_suite as cs;
    rustls::crypto::CryptoProvider {
        cipher_suites: vec![
            // TLS 1.3 (RFC 8446): AES-GCM and ChaCha20-Poly1305, always ECDHE.
            cs::TLS13_AES_128_GCM_SHA256,
            cs::TLS13_AES_256_GCM_SHA384,
            cs::TLS13_CHACHA20_POLY1305_SHA256,
            // TLS 1.2: ECDHE with AES-GCM only (BCP 195 §4.2 recommended suites).
            cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
            cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        ],
        ..provider::default_provider()
    }
}

/// TLS 1.3 and 1.2, nothing older (BCP 195 §3.1.1).
pub static VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// The PEM certificates of `path`, for the config field `field` (at least one).
pub fn load_certificates(field: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read(field, path)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{field} {}: not valid PEM ({e})", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{field} {}: holds no PEM certificate (-----BEGIN CERTIFICATE-----): give a PEM \
             certificate file",
            path.display()
        ));
    }
    Ok(certs)
}

/// The PEM private key of `path` (PKCS#8, PKCS#1 or SEC1), for the config field `field`.
pub fn load_private_key(field: &str, path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let pem = read(field, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => format!(
            "{field} {}: holds no PEM private key (-----BEGIN PRIVATE KEY-----, RSA or EC): give \
             the unencrypted PEM key of the certificate",
            path.display()
        ),
        e => format!("{field} {}: not valid PEM ({e})", path.display()),
    })
}

fn read(field: &str, path: &Path) -> Result<Vec<u8>, String> {
    if path.as_os_str().is_empty() {
        return Err(format!("{field} is not set: name a PEM file"));
    }
    std::fs::read(path).map_err(|e| {
        format!(
            "{field} {}: cannot be read ({e}): give a readable PEM file",
            path.display()
        )
    })
}

/// A root store of the PEM certificates in `path`.
pub fn load_roots(field: &str, path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for c in load_certificates(field, path)? {
        roots.add(c).map_err(|e| {
            format!(
                "{field} {}: not a usable CA certificate ({e})",
                path.display()
            )
        })?;
    }
    Ok(roots)
}

/// The TLS listener's configuration from `[tls]`: its certificate chain and key (checked to
/// match), and with `client_ca` a client certificate signed by that CA required.
pub fn server_config(cfg: &TlsConfig) -> Result<Arc<ServerConfig>, String> {
    let certs = load_certificates("tls.certificate", &cfg.certificate)?;
    let key = load_private_key("tls.private_key", &cfg.private_key)?;
    let provider = Arc::new(profile_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| format!("tls: {e}"))?;
    let builder = if cfg.client_ca.as_os_str().is_empty() {
        builder.with_no_client_auth()
    } else {
        let roots = load_roots("tls.client_ca", &cfg.client_ca)?;
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("tls.client_ca {}: {e}", cfg.client_ca.display()))?;
        builder.with_client_cert_verifier(verifier)
    };
    let config = builder.with_single_cert(certs, key).map_err(|e| {
        format!(
            "tls.private_key {} does not go with tls.certificate {} ({e}): give the key the \
             certificate was made for",
            cfg.private_key.display(),
            cfg.certificate.display()
        )
    })?;
    Ok(Arc::new(config))
}

/// The rustls configuration of a `tls = true` export, read from its files (`None`: plain).
/// `field` starts each error (`"export 0: "`).
pub fn export_client_config(
    e: &crate::config::ExportConfig,
    field: &str,
) -> Result<Option<Arc<rustls::ClientConfig>>, String> {
    if !e.tls {
        return Ok(None);
    }
    let ca = e
        .tls_ca
        .as_deref()
        .ok_or_else(|| format!("{field}tls = true needs tls_ca (the CA's PEM file)"))?;
    let client = match (&e.tls_certificate, &e.tls_private_key) {
        (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
        _ => None,
    };
    let fields = [
        format!("{field}tls_ca"),
        format!("{field}tls_certificate"),
        format!("{field}tls_private_key"),
    ];
    client_config([&fields[0], &fields[1], &fields[2]], ca, client).map(Some)
}

/// The rustls configuration of the connection to the cluster database, from `[cluster]`'s
/// `tls_*` files (`None`: no `tls_ca`, a plain connection).
pub fn cluster_client_config(
    c: &crate::config::ClusterConfig,
) -> Result<Option<Arc<rustls::ClientConfig>>, String> {
    let Some(ca) = &c.tls_ca else {
        return Ok(None);
    };
    let client = match (&c.tls_certificate, &c.tls_private_key) {
        (Some(cert), Some(key)) => Some((cert.as_path(), key.as_path())),
        _ => None,
    };
    let config = client_config(
        [
            "cluster.tls_ca",
            "cluster.tls_certificate",
            "cluster.tls_private_key",
        ],
        ca,
        client,
    )?;
    // PostgreSQL's ALPN name: PostgreSQL 17 requires it with `sslnegotiation=direct`; older
    // servers ignore it.
    let mut config = config.as_ref().clone();
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(Some(Arc::new(config)))
}

/// The TLS files a configuration names, read at start-up (after `Config::check_environment`):
/// `[tls]`'s certificate, key and CA, each `dicom` export's `tls_*`, and `[cluster]`'s
/// `tls_*`. Each error names the field.
pub fn check_files(config: &crate::config::Config) -> Result<(), String> {
    if config.tls.enabled() {
        server_config(&config.tls)?;
    }
    for (i, e) in config.exports.iter().enumerate() {
        if e.kind == crate::config::ExportKind::Dicom {
            export_client_config(e, &format!("export {i}: "))?;
        }
    }
    if let Some(c) = &config.cluster {
        cluster_client_config(c)?;
    }
    Ok(())
}

/// A requestor's TLS configuration (exports, `dicomgate echo/store --tls-ca`): the server's
/// certificate must chain to a CA in `ca`; with `client` = (certificate, key) that client
/// certificate is presented. `fields` name the three settings (CA, certificate, key) in errors
/// (`export 0: tls_ca`, `--tls-ca`, ...).
pub fn client_config(
    fields: [&str; 3],
    ca: &Path,
    client: Option<(&Path, &Path)>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let [ca_field, cert_field, key_field] = fields;
    let roots = load_roots(ca_field, ca)?;
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(profile_provider()))
        .with_protocol_versions(VERSIONS)
        .map_err(|e| format!("{ca_field}: {e}"))?
        .with_root_certificates(roots);
    let config = match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let certs = load_certificates(cert_field, cert)?;
            let k = load_private_key(key_field, key)?;
            builder.with_client_auth_cert(certs, k).map_err(|e| {
                format!(
                    "{key_field} {} does not go with {cert_field} {} ({e}): \
                     give the key the certificate was made for",
                    key.display(),
                    cert.display()
                )
            })?
        }
    };
    Ok(Arc::new(config))
}

/// The rustls session of one TLS connection of a reactor.
#[derive(Debug)]
pub struct Session {
    conn: ServerConnection,
    /// The end of the handshake was reported by [`Session::take_established`].
    reported: bool,
    /// Bytes read off the socket (records) since [`Session::take_received`].
    received: usize,
}

/// Why a TLS connection ended in error: what rustls said, for the log line.
pub fn is_tls_error(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<rustls::Error>())
}

impl Session {
    pub fn new(config: Arc<ServerConfig>) -> Result<Session, rustls::Error> {
        let mut conn = ServerConnection::new(config)?;
        conn.set_buffer_limit(Some(BUFFER_LIMIT));
        Ok(Session {
            conn,
            reported: false,
            received: 0,
        })
    }

    /// Once, after the handshake completed: the protocol version, the cipher suite and whether
    /// the client presented a certificate (for a debug line).
    pub fn take_established(&mut self) -> Option<(String, String, bool)> {
        if self.reported || self.conn.is_handshaking() {
            return None;
        }
        self.reported = true;
        Some((
            self.conn
                .protocol_version()
                .map_or_else(String::new, |v| format!("{v:?}")),
            self.conn
                .negotiated_cipher_suite()
                .map_or_else(String::new, |s| format!("{:?}", s.suite())),
            self.conn.peer_certificates().is_some_and(|c| !c.is_empty()),
        ))
    }

    /// Still in the handshake (nothing of DICOM has been exchanged).
    pub fn is_handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    /// Decrypted bytes into `dst`, reading records from `sock` while none are buffered.
    /// `Ok(0)`: would block (the handshake may have progressed: its answer was written).
    /// `Err` with a [`rustls::Error`] inside (see [`is_tls_error`]): a TLS failure, whose alert
    /// was sent as far as the socket took it; `UnexpectedEof`: the peer closed.
    pub fn read_plaintext(
        &mut self,
        sock: &mut impl ReadWrite,
        dst: &mut [u8],
    ) -> io::Result<usize> {
        if dst.is_empty() {
            return Ok(0);
        }
        loop {
            match self.conn.reader().read(dst) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()), // close_notify
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            let n = loop {
                match self.conn.read_tls(sock) {
                    Ok(n) => {
                        self.received += n;
                        break n;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        // Handshake messages made by what came before go out now.
                        self.flush(sock)?;
                        return Ok(0);
                    }
                    Err(e) => return Err(e),
                }
            };
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            if let Err(e) = self.conn.process_new_packets() {
                // rustls queued the alert that says why: best effort, then close.
                let _ = self.flush(sock);
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
            self.flush(sock)?;
        }
    }

    /// Bytes of TLS records read off the socket since the last call: what a peer sent, as
    /// `[limits] min_bytes_per_second` counts it (a record's plaintext only comes out whole).
    pub fn take_received(&mut self) -> usize {
        std::mem::take(&mut self.received)
    }

    /// Encrypts what it can of `plain` and writes records until done or `WouldBlock`; returns
    /// how many bytes of `plain` rustls took (the rest waits for the next writable event).
    pub fn write_plaintext(
        &mut self,
        sock: &mut impl ReadWrite,
        plain: &[u8],
    ) -> io::Result<usize> {
        let mut taken = 0;
        loop {
            if taken < plain.len() {
                taken += self.conn.writer().write(&plain[taken..])?;
            }
            if !self.conn.wants_write() {
                return Ok(taken);
            }
            match self.conn.write_tls(sock) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(taken),
                Err(e) => return Err(e),
            }
        }
    }

    /// Unsent records remain (the connection is not done writing).
    pub fn wants_write(&self) -> bool {
        self.conn.wants_write()
    }

    fn flush(&mut self, sock: &mut impl ReadWrite) -> io::Result<()> {
        self.write_plaintext(sock, &[]).map(|_| ())
    }

    /// Sends close_notify, as far as the socket takes it at once; nothing when the handshake
    /// never completed (a silent peer dropped by ARTIM gets no bytes, as on the plain port;
    /// one that failed the handshake already got its alert).
    pub fn close(&mut self, sock: &mut impl ReadWrite) {
        if !self.conn.is_handshaking() {
            self.conn.send_close_notify();
        }
        let _ = self.flush(sock);
    }
}

/// A byte stream both ways (a socket).
pub trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

#[cfg(test)]
mod tests {
    /// The TLS files a configuration names are read at start-up (moved here from
    /// `Config::check_environment`, which knows no TLS type): a `tls = true` export whose CA file
    /// is missing is refused naming the field.
    #[test]
    fn tls_files_are_read_at_start_up_naming_the_field() {
        let ok = crate::config::Config::from_toml(
            "[[export]]\nkind = \"dicom\"\naddress = \"127.0.0.1:2762\"\nae_title = \"PACS\"\n\
             tls = true\ntls_ca = \"/ca.pem\"\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let e = super::check_files(&ok).unwrap_err();
        assert!(
            e.contains("export 0: tls_ca /ca.pem: cannot be read"),
            "{e}"
        );
        assert!(super::check_files(&crate::config::Config::default()).is_ok());
    }
}
