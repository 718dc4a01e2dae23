//! Throwaway TLS material for tests: a CA, a server certificate for 127.0.0.1/localhost and a client
//! certificate, generated in-process and written as PEM files (nats-server only reads files).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tempfile::TempDir;

/// Why TLS material could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file or directory operation failed.
    #[error("could not {action}: {source}")]
    Io {
        /// What was being done.
        action: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// Generating a key or certificate failed.
    #[error("could not generate TLS material ({step}): {reason}")]
    Tls {
        /// The step that failed.
        step: &'static str,
        /// The generator's error.
        reason: String,
    },
}

/// PEM files of a freshly generated CA, server certificate and client certificate.
///
/// The files live in a temporary directory that is removed when the last clone of this value is
/// dropped. Cloning is cheap and shares the directory, so one set can be handed to a
/// [`ServerOptions`](crate::server::ServerOptions) and kept by the test to build clients.
#[derive(Clone)]
pub struct TlsFiles {
    /// CA certificate (PEM) that signed both the server and the client certificate.
    pub ca_cert: PathBuf,
    /// Server certificate (PEM), valid for `127.0.0.1`, `::1` and `localhost`.
    pub server_cert: PathBuf,
    /// Server private key (PEM, PKCS#8).
    pub server_key: PathBuf,
    /// Client certificate (PEM) for mutual TLS, usable as a client (not server) certificate.
    pub client_cert: PathBuf,
    /// Client private key (PEM, PKCS#8).
    pub client_key: PathBuf,
    ca_pem: String,
    dir: Arc<TempDir>,
}

impl std::fmt::Debug for TlsFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Paths only: the key material stays out of logs.
        f.debug_struct("TlsFiles")
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

impl TlsFiles {
    /// The CA certificate as PEM text (the same content as the file at [`TlsFiles::ca_cert`]).
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Directory holding all the files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// Generates a new CA, a server certificate for `127.0.0.1`/`::1`/`localhost` and a client
/// certificate (CN `jetsink-test-client`), all signed by that CA, into a new temporary directory.
pub fn generate() -> Result<TlsFiles, TlsError> {
    let dir = tempfile::Builder::new()
        .prefix("jetsink-tls-")
        .tempdir()
        .map_err(|source| TlsError::Io {
            action: "create a temporary directory for TLS files".to_owned(),
            source,
        })?;

    let ca_key = KeyPair::generate().map_err(tls_err("generate the CA key"))?;
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name = rcgen::DistinguishedName::new();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "jetsink test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key)
        .map_err(tls_err("self-sign the CA certificate"))?;
    let ca_pem = ca.pem();

    let server_key = KeyPair::generate().map_err(tls_err("generate the server key"))?;
    let mut server_params = CertificateParams::new(vec![
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
        "localhost".to_owned(),
    ])
    .map_err(tls_err("build the server certificate parameters"))?;
    server_params.distinguished_name = rcgen::DistinguishedName::new();
    server_params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    server_params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = server_params
        .signed_by(&server_key, &ca)
        .map_err(tls_err("sign the server certificate"))?;

    let client_key = KeyPair::generate().map_err(tls_err("generate the client key"))?;
    let mut client_params = CertificateParams::default();
    client_params.distinguished_name = rcgen::DistinguishedName::new();
    client_params
        .distinguished_name
        .push(DnType::CommonName, "jetsink-test-client");
    client_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client_cert = client_params
        .signed_by(&client_key, &ca)
        .map_err(tls_err("sign the client certificate"))?;

    let files = TlsFiles {
        ca_cert: dir.path().join("ca.pem"),
        server_cert: dir.path().join("server-cert.pem"),
        server_key: dir.path().join("server-key.pem"),
        client_cert: dir.path().join("client-cert.pem"),
        client_key: dir.path().join("client-key.pem"),
        ca_pem,
        dir: Arc::new(dir),
    };
    write(&files.ca_cert, &files.ca_pem)?;
    write(&files.server_cert, &server_cert.pem())?;
    write(&files.server_key, &server_key.serialize_pem())?;
    write(&files.client_cert, &client_cert.pem())?;
    write(&files.client_key, &client_key.serialize_pem())?;
    Ok(files)
}

fn write(path: &Path, contents: &str) -> Result<(), TlsError> {
    std::fs::write(path, contents).map_err(|source| TlsError::Io {
        action: format!("write {}", path.display()),
        source,
    })
}

fn tls_err(step: &'static str) -> impl Fn(rcgen::Error) -> TlsError {
    move |e| TlsError::Tls {
        step,
        reason: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_pem_files_signed_by_one_ca() {
        let files = generate().expect("generate TLS files");
        for path in [&files.ca_cert, &files.server_cert, &files.client_cert] {
            let text = std::fs::read_to_string(path).expect("read cert");
            assert!(text.starts_with("-----BEGIN CERTIFICATE-----"), "{path:?}");
        }
        for path in [&files.server_key, &files.client_key] {
            let text = std::fs::read_to_string(path).expect("read key");
            assert!(text.starts_with("-----BEGIN PRIVATE KEY-----"), "{path:?}");
        }
        assert_eq!(
            std::fs::read_to_string(&files.ca_cert).expect("read ca"),
            files.ca_pem()
        );
        let dir = files.dir().to_path_buf();
        let clone = files.clone();
        drop(files);
        assert!(dir.exists(), "a live clone keeps the directory");
        drop(clone);
        assert!(!dir.exists(), "the last clone removes the directory");
    }
}
