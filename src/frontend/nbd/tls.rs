//! TLS for NBD over TCP (the protocol's `NBD_OPT_STARTTLS`), with rustls:
//! the server presents its certificate and requires a client certificate
//! signed by the configured CA.
//!
//! Invariants:
//! 1. A server built with a [`TlsAcceptor`] answers every option other than
//!    `NBD_OPT_STARTTLS` and `NBD_OPT_ABORT` with `NBD_REP_ERR_TLS_REQD`
//!    until TLS is up, and closes on `NBD_OPT_EXPORT_NAME`: no export is
//!    named, sized or served in plaintext.
//! 2. A client without a certificate, or with one the CA did not sign,
//!    fails the TLS handshake; nothing else is sent to it.
//! 3. Only TLS 1.2 and 1.3 with rustls' safe defaults (aws-lc-rs) are used.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

pub use tokio_rustls::TlsAcceptor;

/// Where the server's PEM files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server's certificate chain (leaf first).
    pub cert: PathBuf,
    /// The server's private key.
    pub key: PathBuf,
    /// CA certificates that sign client certificates.
    pub client_ca: PathBuf,
}

/// Why the TLS settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {what}: {reason}", .path.display())]
    File {
        path: PathBuf,
        what: &'static str,
        reason: String,
    },
    #[error("TLS setup: {0}")]
    Setup(String),
}

fn file_err(path: &Path, what: &'static str, reason: impl ToString) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        what,
        reason: reason.to_string(),
    }
}

fn certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(path, what, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(path, what, e))?;
    if certs.is_empty() {
        return Err(file_err(path, what, "no PEM certificate in the file"));
    }
    Ok(certs)
}

/// Load the files and build the acceptor.
pub fn acceptor(files: &TlsFiles) -> Result<TlsAcceptor, TlsError> {
    let chain = certs(&files.cert, "server certificate")?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| file_err(&files.key, "server private key", e))?;
    let mut roots = RootCertStore::empty();
    for ca in certs(&files.client_ca, "client CA")? {
        roots
            .add(ca)
            .map_err(|e| file_err(&files.client_ca, "client CA", e))?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsError::Setup(format!("client certificate verifier: {e}")))?;
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Setup(format!("server certificate and key: {e}")))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}
