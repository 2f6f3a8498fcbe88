//! TLS to PostgreSQL, with rustls: the connection string's `sslmode` and
//! `sslrootcert`, read as libpq reads them, so one URL works for `psql` and
//! for Tandem.
//!
//! | `sslmode` | encrypted | certificate checked |
//! | --- | --- | --- |
//! | `disable` | never | — |
//! | `prefer` (the default) | when the server offers TLS | no |
//! | `require` | always | no; with `sslrootcert`, as `verify-ca` |
//! | `verify-ca` | always | signed by an authority of `sslrootcert` |
//! | `verify-full` | always | signed so, and naming the host connected to |
//!
//! `sslrootcert` is a PEM file of the authorities to trust, or `system` for
//! the operating system's store. The driver (`tokio-postgres`) knows only
//! `disable`, `prefer` and `require`, so [`split_settings`] takes both
//! parameters out of the string before the driver parses the rest, and the
//! certificate checks are the verifier's below. A Unix-socket connection is
//! never encrypted, as with libpq (the driver cannot name such a host for
//! TLS). Client certificates are not supported and are refused by name
//! rather than ignored.

use crate::StoreError;
use postgres::config::{Host, SslMode as DriverSslMode};
use postgres::{Client, Config, NoTls};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::path::PathBuf;
use std::sync::Arc;
use tokio_postgres_rustls::MakeRustlsConnect;

/// libpq's `sslmode`: whether to encrypt, and what to check.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(text: &str) -> Result<SslMode, TlsError> {
        Ok(match text {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            // libpq's `allow` tries without TLS first; nothing here does that.
            other => return Err(TlsError::Mode(other.to_owned())),
        })
    }

    fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// The certificate authorities a verifying mode trusts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RootCertificates {
    /// A PEM file of one or more certificates.
    File(PathBuf),
    /// The operating system's trust store (`sslrootcert=system`).
    System,
}

/// The TLS part of a connection string.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsSettings {
    pub mode: SslMode,
    pub root_certificates: Option<RootCertificates>,
}

/// The connection string's TLS settings cannot be used, or the server's
/// certificate was refused.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("sslmode must be disable, prefer, require, verify-ca or verify-full, got {0:?}")]
    Mode(String),
    #[error(
        "sslmode={0} needs sslrootcert: the PEM file of the certificate authorities to trust \
         (or sslrootcert=system for the system's)"
    )]
    NoRootCertificates(&'static str),
    #[error("cannot read the certificate authorities in {path} (sslrootcert): {reason}")]
    RootCertificates { path: String, reason: String },
    #[error("{0} (sslrootcert) holds no certificate")]
    NoCertificateIn(String),
    #[error("the system's certificate authorities (sslrootcert=system) could not be loaded: {0}")]
    SystemRoots(String),
    #[error("{0} is not supported: tandem does not present client certificates")]
    ClientCertificate(String),
    #[error("tls could not be set up: {0}")]
    Setup(String),
    #[error("the postgresql server's certificate was refused ({checks}): {reason}")]
    Refused {
        /// The mode and the authorities it was checked against.
        checks: String,
        /// rustls' reason.
        reason: String,
        source: postgres::Error,
    },
}

/// Parameters that ask for a client certificate, which is not supported.
const CLIENT_CERTIFICATE_PARAMETERS: &[&str] = &["sslcert", "sslkey", "sslpassword", "sslcertmode"];

/// Takes `sslmode` and `sslrootcert` out of a `postgres://` URL or a
/// `key=value` string: the rest, for the driver to parse, and the settings.
/// A `key=value` string this cannot read is passed on whole, for the
/// driver's own error.
pub fn split_settings(connection: &str) -> Result<(String, TlsSettings), TlsError> {
    let trimmed = connection.trim();
    let is_url = ["postgres://", "postgresql://"].iter().any(|scheme| trimmed.starts_with(scheme));
    let (rest, parameters) = if is_url {
        split_url(trimmed)
    } else {
        match split_key_values(trimmed) {
            Some(split) => split,
            None => return Ok((connection.to_owned(), TlsSettings::default())),
        }
    };
    let mut settings = TlsSettings::default();
    for (key, value) in parameters {
        match key.as_str() {
            "sslmode" => settings.mode = SslMode::parse(&value)?,
            "sslrootcert" => {
                settings.root_certificates = Some(if value == "system" {
                    RootCertificates::System
                } else {
                    RootCertificates::File(PathBuf::from(value))
                })
            }
            _ => return Err(TlsError::ClientCertificate(key)),
        }
    }
    Ok((rest, settings))
}

fn is_taken(key: &str) -> bool {
    key == "sslmode" || key == "sslrootcert" || CLIENT_CERTIFICATE_PARAMETERS.contains(&key)
}

/// `postgres://…?a=1&sslmode=require&b=2` → (`postgres://…?a=1&b=2`, [sslmode]).
fn split_url(url: &str) -> (String, Vec<(String, String)>) {
    let Some((base, query)) = url.split_once('?') else { return (url.to_owned(), Vec::new()) };
    let mut kept = Vec::new();
    let mut taken = Vec::new();
    for part in query.split('&').filter(|part| !part.is_empty()) {
        let (key, value) = part.split_once('=').unwrap_or((part, ""));
        let key = percent_decode(key);
        if is_taken(&key) {
            taken.push((key, percent_decode(value)));
        } else {
            kept.push(part);
        }
    }
    let rest = if kept.is_empty() { base.to_owned() } else { format!("{base}?{}", kept.join("&")) };
    (rest, taken)
}

/// `%XX` escapes decoded, as libpq decodes URL parameters (`+` stays `+`).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let escaped = (bytes[index] == b'%')
            .then(|| bytes.get(index + 1..index + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                decoded.push(byte);
                index += 3;
            }
            None => {
                decoded.push(bytes[index]);
                index += 1;
            }
        }
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

/// `host=a sslmode='verify-full' user=b` → (`host=a user=b`, [sslmode]);
/// `None` when the string is not well-formed `key=value` pairs.
fn split_key_values(text: &str) -> Option<(String, Vec<(String, String)>)> {
    let characters: Vec<char> = text.chars().collect();
    let mut index = 0;
    let skip_spaces = |index: &mut usize| {
        while characters.get(*index).is_some_and(|character| character.is_whitespace()) {
            *index += 1;
        }
    };
    let mut kept: Vec<String> = Vec::new();
    let mut taken = Vec::new();
    loop {
        skip_spaces(&mut index);
        if index >= characters.len() {
            break;
        }
        let start = index;
        while characters.get(index).is_some_and(|character| *character != '=' && !character.is_whitespace()) {
            index += 1;
        }
        let key: String = characters[start..index].iter().collect();
        skip_spaces(&mut index);
        if key.is_empty() || characters.get(index) != Some(&'=') {
            return None;
        }
        index += 1;
        skip_spaces(&mut index);
        let mut value = String::new();
        if characters.get(index) == Some(&'\'') {
            index += 1;
            loop {
                match characters.get(index)? {
                    '\'' => break,
                    '\\' => {
                        value.push(*characters.get(index + 1)?);
                        index += 2;
                    }
                    character => {
                        value.push(*character);
                        index += 1;
                    }
                }
            }
            index += 1;
        } else {
            while let Some(character) = characters.get(index).filter(|character| !character.is_whitespace()) {
                if *character == '\\' {
                    value.push(*characters.get(index + 1)?);
                    index += 2;
                } else {
                    value.push(*character);
                    index += 1;
                }
            }
        }
        if is_taken(&key) {
            taken.push((key, value));
        } else {
            kept.push(characters[start..index].iter().collect());
        }
    }
    Some((kept.join(" "), taken))
}

/// Checks a connection string as [`connect`] reads it, without connecting:
/// its `sslmode` and `sslrootcert` (the file is read), and the rest as the
/// driver parses it. For settings stored to connect later, such as a
/// warehouse destination's.
pub fn check(connection: &str) -> Result<(), StoreError> {
    let (rest, settings) = split_settings(connection)?;
    let mut config: Config = rest.parse()?;
    Connector::new(&settings, &mut config)?;
    Ok(())
}

/// Opens one connection with TLS as the string's `sslmode` and
/// `sslrootcert` say, as a store's connections are opened: for a database
/// outside the store, such as a warehouse destination's.
pub fn connect(connection: &str) -> Result<Client, StoreError> {
    let (rest, settings) = split_settings(connection)?;
    let mut config: Config = rest.parse()?;
    Connector::new(&settings, &mut config)?.connect(&config)
}

/// How a store opens its connections: without TLS, or with rustls and the
/// verifier its `sslmode` asks for. Cheap to clone.
#[derive(Clone)]
pub(super) enum Connector {
    Plain,
    /// With what the certificate is checked against, for a refusal's error.
    Rustls(MakeRustlsConnect, Arc<str>),
}

impl Connector {
    /// The connector for `settings`, with `config`'s own `sslmode` set to
    /// what the driver should negotiate. Reads the certificate authorities
    /// now, so a missing or unreadable file is an error before connecting.
    pub fn new(settings: &TlsSettings, config: &mut Config) -> Result<Connector, TlsError> {
        let only_unix_sockets = config.get_hosts().iter().all(|host| matches!(host, Host::Unix(_)));
        config.ssl_mode(match settings.mode {
            SslMode::Disable => DriverSslMode::Disable,
            SslMode::Prefer => DriverSslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => DriverSslMode::Require,
        });
        if settings.mode == SslMode::Disable || (only_unix_sockets && !config.get_hosts().is_empty()) {
            config.ssl_mode(DriverSslMode::Disable);
            return Ok(Connector::Plain);
        }
        let check = match (settings.mode, &settings.root_certificates) {
            (SslMode::VerifyFull, Some(_)) => Check::ChainAndHost,
            (SslMode::VerifyCa | SslMode::Require, Some(_)) => Check::Chain,
            (SslMode::VerifyCa | SslMode::VerifyFull, None) => {
                return Err(TlsError::NoRootCertificates(settings.mode.as_str()))
            }
            (_, _) => Check::Nothing,
        };
        // ring, as the rest of the binary (the webhook client, the NATS
        // client) builds rustls; aws-lc-rs, which rustls now prefers, would
        // add a C toolchain to the build for the same algorithms.
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (chain, checks) = match &settings.root_certificates {
            Some(roots) if check != Check::Nothing => {
                let (store, named) = root_store(roots)?;
                let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider.clone())
                    .build()
                    .map_err(|error| TlsError::Setup(error.to_string()))?;
                (Some(verifier), format!("sslmode={}, authorities from {named}", settings.mode.as_str()))
            }
            _ => (None, format!("sslmode={}", settings.mode.as_str())),
        };
        let verifier = Verifier { check, chain, provider: provider.clone() };
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|error| TlsError::Setup(error.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        Ok(Connector::Rustls(MakeRustlsConnect::new(client), checks.into()))
    }

    /// Opens one connection with `config`; a refused certificate says what
    /// it was checked against.
    pub fn connect(&self, config: &Config) -> Result<Client, StoreError> {
        match self {
            Connector::Plain => Ok(config.connect(NoTls)?),
            Connector::Rustls(tls, checks) => {
                config.connect(tls.clone()).map_err(|error| match refused_certificate(&error) {
                    Some(reason) => TlsError::Refused { checks: checks.to_string(), reason, source: error }.into(),
                    None => error.into(),
                })
            }
        }
    }
}

/// rustls' reason when a connection failed because it refused the
/// certificate. The driver wraps rustls' error in an I/O error, whose
/// `source` skips it, and does not show it in its own message.
fn refused_certificate(error: &postgres::Error) -> Option<String> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = cause {
        let found = current
            .downcast_ref::<rustls::Error>()
            .or_else(|| current.downcast_ref::<std::io::Error>()?.get_ref()?.downcast_ref::<rustls::Error>());
        if let Some(refused @ rustls::Error::InvalidCertificate(_)) = found {
            return Some(refused.to_string());
        }
        cause = current.source();
    }
    None
}

/// The connector a bare driver configuration implies: its own `sslmode`
/// (`disable`, `prefer` or `require`), certificates unchecked.
pub(super) fn connector_for(config: &mut Config) -> Connector {
    let mode = match config.get_ssl_mode() {
        DriverSslMode::Disable => SslMode::Disable,
        DriverSslMode::Require => SslMode::Require,
        _ => SslMode::Prefer,
    };
    Connector::new(&TlsSettings { mode, root_certificates: None }, config)
        .expect("no certificate authorities to read, so nothing can fail")
}

/// The trusted authorities, and how to name them in an error.
fn root_store(roots: &RootCertificates) -> Result<(RootCertStore, String), TlsError> {
    let mut store = RootCertStore::empty();
    match roots {
        RootCertificates::File(path) => {
            let shown = path.display().to_string();
            let unreadable = |reason: String| TlsError::RootCertificates { path: shown.clone(), reason };
            // Read first: a missing file says so, not "no certificate".
            let pem = std::fs::read(path).map_err(|error| unreadable(error.to_string()))?;
            for certificate in CertificateDer::pem_slice_iter(&pem) {
                let certificate = certificate.map_err(|error| unreadable(error.to_string()))?;
                store.add(certificate).map_err(|error| unreadable(error.to_string()))?;
            }
            if store.is_empty() {
                return Err(TlsError::NoCertificateIn(shown));
            }
            Ok((store, format!("sslrootcert {shown}")))
        }
        RootCertificates::System => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                let errors: Vec<String> = found.errors.iter().map(ToString::to_string).collect();
                return Err(TlsError::SystemRoots(if errors.is_empty() {
                    "none found".to_owned()
                } else {
                    errors.join("; ")
                }));
            }
            Ok((store, "the system's trust store".to_owned()))
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Check {
    /// `prefer` and `require` without authorities: encryption against
    /// eavesdropping only, as libpq does.
    Nothing,
    /// `verify-ca`: the chain up to a trusted authority.
    Chain,
    /// `verify-full`: the chain, and the host name (or address) connected to.
    ChainAndHost,
}

/// Checks the server's certificate as the mode asks; the handshake's
/// signatures are always checked, so a server must hold the key of the
/// certificate it shows.
#[derive(Debug)]
struct Verifier {
    check: Check,
    /// The web PKI verifier over the trusted authorities.
    chain: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(verifier) = &self.chain else { return Ok(ServerCertVerified::assertion()) };
        match verifier.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            // The chain is checked before the name, so it held.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if self.check == Check::Chain => Ok(ServerCertVerified::assertion()),
            checked => checked,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            certificate,
            signature,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            certificate,
            signature,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::super::PostgresStore;
    use super::*;

    fn split(text: &str) -> (String, TlsSettings) {
        split_settings(text).unwrap()
    }

    #[test]
    fn url_parameters_are_taken_out_and_the_rest_kept_in_order() {
        let (rest, settings) =
            split("postgres://u:p@db:5432/tandem?connect_timeout=3&sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&application_name=x");
        assert_eq!(rest, "postgres://u:p@db:5432/tandem?connect_timeout=3&application_name=x");
        assert_eq!(
            settings,
            TlsSettings {
                mode: SslMode::VerifyFull,
                root_certificates: Some(RootCertificates::File("/etc/ca.pem".into()))
            }
        );
        let (rest, settings) = split("postgresql://db/tandem?sslmode=disable");
        assert_eq!((rest.as_str(), settings.mode), ("postgresql://db/tandem", SslMode::Disable));
        let (rest, settings) = split("postgres://db/tandem");
        assert_eq!((rest.as_str(), settings), ("postgres://db/tandem", TlsSettings::default()));
        assert_eq!(split("postgres://db/x?sslrootcert=system").1.root_certificates, Some(RootCertificates::System));
    }

    #[test]
    fn key_value_strings_are_read_with_quotes_and_escapes() {
        let (rest, settings) =
            split("host=db user=tandem sslmode = 'verify-ca' sslrootcert='/etc/my ca\\'s.pem' dbname=t");
        assert_eq!(rest, "host=db user=tandem dbname=t");
        assert_eq!(settings.mode, SslMode::VerifyCa);
        assert_eq!(settings.root_certificates, Some(RootCertificates::File("/etc/my ca's.pem".into())));
        assert_eq!(split("host=db").0, "host=db");
        // Unreadable: passed on whole for the driver to refuse.
        assert_eq!(split("host=db sslmode='open").0, "host=db sslmode='open");
    }

    #[test]
    fn bad_settings_are_refused_by_name() {
        let mode = split_settings("postgres://db/x?sslmode=allow").unwrap_err();
        assert_eq!(
            mode.to_string(),
            "sslmode must be disable, prefer, require, verify-ca or verify-full, got \"allow\""
        );
        let client = split_settings("postgres://db/x?sslcert=/c.pem").unwrap_err();
        assert!(client.to_string().starts_with("sslcert is not supported"), "{client}");

        let mut config: Config = "postgres://db/x".parse().unwrap();
        let settings = TlsSettings { mode: SslMode::VerifyFull, root_certificates: None };
        let missing = Connector::new(&settings, &mut config).err().unwrap();
        assert!(missing.to_string().starts_with("sslmode=verify-full needs sslrootcert"), "{missing}");

        let dir = tempfile::tempdir().unwrap();
        let absent = dir.path().join("absent.pem");
        let settings = TlsSettings { mode: SslMode::VerifyCa, root_certificates: Some(RootCertificates::File(absent)) };
        let unreadable = Connector::new(&settings, &mut config).err().unwrap();
        assert!(unreadable.to_string().starts_with("cannot read the certificate authorities in"), "{unreadable}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let settings = TlsSettings { mode: SslMode::VerifyCa, root_certificates: Some(RootCertificates::File(empty)) };
        let none = Connector::new(&settings, &mut config).err().unwrap();
        assert!(none.to_string().ends_with("(sslrootcert) holds no certificate"), "{none}");
    }

    /// A certificate authority named `authority_name` and a server
    /// certificate for `server_names` that it signed: (authority PEM, certificate
    /// PEM, key PEM).
    fn authority_and_server(authority_name: &str, server_names: &[&str]) -> (String, String, String) {
        let authority_key = rcgen::KeyPair::generate().unwrap();
        let mut authority = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        authority.distinguished_name.push(rcgen::DnType::CommonName, authority_name);
        authority.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let authority_pem = authority.self_signed(&authority_key).unwrap().pem();
        let issuer = rcgen::Issuer::new(authority, authority_key);
        let server_key = rcgen::KeyPair::generate().unwrap();
        let names: Vec<String> = server_names.iter().map(|name| (*name).to_owned()).collect();
        let server = rcgen::CertificateParams::new(names).unwrap().signed_by(&server_key, &issuer).unwrap();
        (authority_pem, server.pem(), server_key.serialize_pem())
    }

    /// Whether every connection of the store's own (`application_name`
    /// tandem) to the server is encrypted, and how many there are.
    fn encrypted_connections(store: &PostgresStore) -> (bool, i64) {
        store
            .with_client(|client| {
                let row = client.query_one(
                    "SELECT bool_and(s.ssl), COUNT(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
                     WHERE a.application_name = 'tandem'",
                    &[],
                )?;
                Ok((row.try_get::<_, Option<bool>>(0)?.unwrap_or(false), row.try_get(1)?))
            })
            .unwrap()
    }

    #[test]
    fn a_server_with_tls_is_reached_encrypted_and_its_certificate_checked_as_the_mode_says() {
        use crate::{Coordination, Stage};
        let (authority, certificate, key) = authority_and_server("Tandem test authority", &["localhost"]);
        let Some(cluster) = super::super::testing::PrivateCluster::start_with_tls(&certificate, &key) else { return };
        let dir = tempfile::tempdir().unwrap();
        let trusted = dir.path().join("authority.pem");
        std::fs::write(&trusted, &authority).unwrap();
        let (other_authority, _, _) = authority_and_server("Another authority", &["localhost"]);
        let untrusted = dir.path().join("other-authority.pem");
        std::fs::write(&untrusted, other_authority).unwrap();
        let url =
            |host: &str, parameters: &str| format!("postgres://postgres@{host}:{}/postgres?{parameters}", cluster.port);

        // The server refuses plain connections, so every store that works
        // below used TLS; pg_stat_ssl says so too.
        let plain = PostgresStore::connect(&url("127.0.0.1", "sslmode=disable")).err().unwrap();
        assert!(format!("{plain:?}").contains("no encryption"), "{plain:?}");
        for parameters in ["", "sslmode=prefer", "sslmode=require"] {
            let store = PostgresStore::connect(&url("127.0.0.1", parameters)).unwrap();
            assert!(encrypted_connections(&store).0, "{parameters:?}");
        }

        // verify-full: a trusted authority and the host the certificate names.
        let trusted_roots = format!("sslrootcert={}", trusted.display());
        let store = PostgresStore::connect(&url("localhost", &format!("sslmode=verify-full&{trusted_roots}"))).unwrap();
        // The lease's connection, made outside the pool, is encrypted too.
        let lease = store.try_lease(Stage::RESOLVE).unwrap().expect("a vacant lease");
        let (all_encrypted, connections) = encrypted_connections(&store);
        assert!(all_encrypted && connections >= 2, "{connections} connections, all encrypted: {all_encrypted}");
        drop(lease);

        // The certificate does not name 127.0.0.1: verify-full refuses, and
        // verify-ca, which checks the authority only, accepts.
        let wrong_host =
            PostgresStore::connect(&url("127.0.0.1", &format!("sslmode=verify-full&{trusted_roots}"))).err().unwrap();
        let said = wrong_host.to_string();
        assert!(
            said.starts_with(
                "the postgresql server's certificate was refused (sslmode=verify-full, authorities from sslrootcert"
            ),
            "{said}"
        );
        assert!(said.contains("not valid for name \"127.0.0.1\""), "{said}");
        PostgresStore::connect(&url("127.0.0.1", &format!("sslmode=verify-ca&{trusted_roots}"))).unwrap();

        // An authority that did not sign the server's certificate is refused
        // in every mode that checks it (require with sslrootcert is verify-ca).
        for mode in ["verify-full", "verify-ca", "require"] {
            let parameters = format!("sslmode={mode}&sslrootcert={}", untrusted.display());
            let refused = PostgresStore::connect(&url("localhost", &parameters)).err().unwrap();
            let said = refused.to_string();
            assert!(
                said.starts_with(&format!(
                    "the postgresql server's certificate was refused (sslmode={mode}, authorities from sslrootcert {}",
                    untrusted.display()
                )),
                "{said}"
            );
            assert!(said.contains("UnknownIssuer"), "{said}");
            assert!(matches!(refused, StoreError::Tls(TlsError::Refused { .. })));
        }

        // One connection outside a store (a warehouse destination's) reads
        // the same settings: encrypted and checked, or refused alike.
        let checked = url("localhost", &format!("sslmode=verify-full&{trusted_roots}"));
        check(&checked).unwrap();
        let mut client = connect(&checked).unwrap();
        let row = client.query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[]).unwrap();
        assert!(row.get::<_, bool>(0), "the connection is encrypted");
        let untrusted_url = url("localhost", &format!("sslmode=verify-ca&sslrootcert={}", untrusted.display()));
        let refused = connect(&untrusted_url).err().unwrap();
        assert!(matches!(refused, StoreError::Tls(TlsError::Refused { .. })), "{refused}");
        assert!(matches!(connect(&url("127.0.0.1", "sslmode=disable")), Err(StoreError::Backend(_))));
        let missing = check("postgres://db/x?sslmode=verify-full").unwrap_err();
        assert!(missing.to_string().starts_with("sslmode=verify-full needs sslrootcert"), "{missing}");
        let absent =
            check(&format!("postgres://db/x?sslmode=verify-ca&sslrootcert={}", dir.path().join("no.pem").display()));
        assert!(absent.unwrap_err().to_string().starts_with("cannot read the certificate authorities in"));
        assert!(check("postgres://db/x?sslmode=sometimes").is_err());
    }

    #[test]
    fn modes_map_to_what_the_driver_negotiates() {
        let mut config: Config = "postgres://db/x".parse().unwrap();
        assert!(matches!(connector_for(&mut config), Connector::Rustls(..)), "libpq's default, prefer, tries tls");
        assert_eq!(config.get_ssl_mode(), DriverSslMode::Prefer);
        let settings = TlsSettings { mode: SslMode::Disable, root_certificates: None };
        assert!(matches!(Connector::new(&settings, &mut config).unwrap(), Connector::Plain));
        assert_eq!(config.get_ssl_mode(), DriverSslMode::Disable);
        let settings = TlsSettings { mode: SslMode::Require, root_certificates: None };
        assert!(matches!(Connector::new(&settings, &mut config).unwrap(), Connector::Rustls(..)));
        assert_eq!(config.get_ssl_mode(), DriverSslMode::Require);
        let mut socket: Config = "host=/var/run/postgresql dbname=x".parse().unwrap();
        assert!(matches!(connector_for(&mut socket), Connector::Plain), "never over a unix socket");
    }
}
