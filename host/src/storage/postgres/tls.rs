//! TLS to PostgreSQL, through rustls. The URL's `sslmode` takes libpq's
//! five values (tokio-postgres knows three, and none that checks the
//! certificate): `disable`, `prefer`, `require` (encrypted, certificate not
//! checked), `verify-ca` (the chain, to the roots) and `verify-full` (the
//! chain and the host name). The roots are `sslrootcert` (a PEM file), or
//! the system's. `prefer` never falls back to plaintext silently: at start,
//! a server that refuses TLS is logged as a warning, and every connection
//! is then plaintext; one that takes TLS gets it on every connection.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::config::SslMode as WireMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::storage::{ErrorClass, Result, StorageError};

/// What `sslmode` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<SslMode> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(invalid(format!(
                    "sslmode={other}: use disable, prefer, require, verify-ca or verify-full"
                )));
            }
        })
    }
}

fn invalid(message: String) -> StorageError {
    StorageError::new(
        ErrorClass::Other,
        format!("invalid PostgreSQL URL: {message}"),
    )
}

/// A URL split into what tokio-postgres reads and jobhost's TLS settings.
pub(super) struct Target {
    pub(super) config: tokio_postgres::Config,
    pub(super) mode: SslMode,
    root_cert: Option<PathBuf>,
}

impl Target {
    /// Reads `postgres://…?sslmode=…&sslrootcert=…&…` (libpq's URL form);
    /// `sslmode` defaults to `prefer`, as in libpq.
    pub(super) fn parse(url: &str) -> Result<Target> {
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let (mut mode, mut root_cert) = (SslMode::Prefer, None);
        let mut rest = Vec::new();
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            match pair.split_once('=') {
                Some(("sslmode", value)) => mode = SslMode::parse(value)?,
                Some(("sslrootcert", value)) => root_cert = Some(PathBuf::from(value)),
                _ => rest.push(pair),
            }
        }
        let url = if rest.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", rest.join("&"))
        };
        let config = url.parse().map_err(|e| invalid(format!("{e}")))?;
        Ok(Target {
            config,
            mode,
            root_cert,
        })
    }

    /// The connector for `mode`, with the wire mode tokio-postgres must use
    /// (`prefer` is decided at start: see [`super::PgStore::open`]).
    pub(super) fn connector(&self, mode: SslMode) -> Result<Connector> {
        let wire = match mode {
            SslMode::Disable => return Ok(Connector::Plain),
            _ => WireMode::Require,
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let webpki = match mode {
            SslMode::VerifyCa | SslMode::VerifyFull => Some(
                WebPkiServerVerifier::builder_with_provider(
                    Arc::new(self.roots()?),
                    provider.clone(),
                )
                .build()
                .map_err(|e| invalid(format!("the root certificates: {e}")))?,
            ),
            _ => None,
        };
        let verifier = Verifier {
            mode,
            webpki,
            provider: provider.clone(),
        };
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid(format!("{e}")))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        Ok(Connector::Tls(MakeRustlsConnect::new(config), wire))
    }

    fn roots(&self) -> Result<RootCertStore> {
        let mut roots = RootCertStore::empty();
        match &self.root_cert {
            Some(path) => {
                let certificates = CertificateDer::pem_file_iter(path)
                    .and_then(|certs| certs.collect::<std::result::Result<Vec<_>, _>>())
                    .map_err(|e| invalid(format!("sslrootcert={}: {e}", path.display())))?;
                roots.add_parsable_certificates(certificates);
            }
            None => {
                roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            }
        }
        if roots.is_empty() {
            return Err(invalid(
                "no root certificate to check the server's against (give sslrootcert)".into(),
            ));
        }
        Ok(roots)
    }
}

/// How connections are made: in plaintext, or with TLS.
#[derive(Clone)]
pub(super) enum Connector {
    Plain,
    Tls(MakeRustlsConnect, WireMode),
}

impl Connector {
    /// `config` as this connector needs it.
    pub(super) fn configure(&self, config: &tokio_postgres::Config) -> tokio_postgres::Config {
        let mut config = config.clone();
        config.ssl_mode(match self {
            Connector::Plain => WireMode::Disable,
            Connector::Tls(_, wire) => *wire,
        });
        config
    }
}

/// Checks the server's certificate as `mode` asks. The handshake's
/// signatures are always checked: even `require` talks to the holder of
/// the certificate's key.
#[derive(Debug)]
struct Verifier {
    mode: SslMode,
    webpki: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let Some(webpki) = &self.webpki else {
            return Ok(ServerCertVerified::assertion());
        };
        match webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if self.mode == SslMode::VerifyCa => Ok(ServerCertVerified::assertion()),
            verified => verified,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Decides `prefer` once, at start: TLS (on every connection) if the server
/// takes it; plaintext, said loudly, if it refuses.
pub(super) async fn prefer(target: &Target) -> Result<Connector> {
    let connector = target.connector(SslMode::Require)?;
    let Connector::Tls(make, _) = &connector else {
        unreachable!("require always makes a TLS connector")
    };
    match connector
        .configure(&target.config)
        .connect(make.clone())
        .await
    {
        Ok(_) => Ok(connector),
        Err(error) if error.to_string().contains("server does not support TLS") => {
            tracing::warn!(
                "PostgreSQL refused TLS: every connection is plaintext (sslmode=prefer); \
                 give sslmode=verify-full (or require) to refuse that"
            );
            Ok(Connector::Plain)
        }
        Err(error) => Err(error.into()),
    }
}
