//! The TLS client setup of `wss://` links: the system's roots, or a CA
//! file (with or without the system's roots besides).

use std::sync::Arc;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio_tungstenite::Connector;

use super::Endpoint;

/// The connector for `endpoint`: `None` for tokio-tungstenite's own (the
/// system's roots), or why the CA file cannot be used.
pub(super) fn connector(endpoint: &Endpoint) -> Result<Option<Connector>, String> {
    let Some(ca_file) = &endpoint.ca_file else {
        // tokio-tungstenite's own: the system's roots.
        return Ok(None);
    };
    let mut roots = rustls::RootCertStore::empty();
    if endpoint.system_roots {
        let native = rustls_native_certs::load_native_certs();
        for err in &native.errors {
            tracing::warn!(error = %err, "cannot read some of the system's CA certificates");
        }
        roots.add_parsable_certificates(native.certs);
    }
    let certs = CertificateDer::pem_file_iter(ca_file)
        .map_err(|e| format!("ca_file {}: {e}", ca_file.display()))?;
    for cert in certs {
        let cert = cert.map_err(|e| format!("ca_file {}: {e}", ca_file.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("ca_file {}: {e}", ca_file.display()))?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Some(Connector::Rustls(Arc::new(config))))
}
