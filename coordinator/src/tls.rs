//! TLS on the coordinator's listener (`[tls] cert_file`, `key_file`), so
//! agents can use `wss://` and clients `https://` without a proxy.
//!
//! Handshakes run in their own tasks with a time limit, so a slow or
//! silent client never holds up the accept loop. The certificate can be
//! reloaded from its files ([`Certificate::reload`], on SIGHUP): new
//! handshakes use the new one, connections already open keep theirs.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use lingua_shared::sync;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::config::TlsConfig;

/// Longest a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a connection may stay silent before its first bytes: a TLS
/// client speaks first (its hello), at once. A socket that says nothing
/// holds a handshake permit this long, not the whole handshake timeout.
const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections in TLS handshake at once; each holds a descriptor beside
/// the connections the server counts.
pub const MAX_HANDSHAKES: usize = 256;

/// Why the certificate or key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate file is unreadable or holds no PEM certificate.
    #[error("tls.cert_file {path}: {message}")]
    Certificate {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The key file is unreadable or holds no PEM private key.
    #[error("tls.key_file {path}: {message}")]
    Key {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// rustls refused the pair (a key that does not match the certificate).
    #[error("tls: certificate and key do not work together: {0}")]
    Rejected(#[from] rustls::Error),
}

/// The listener's certificate and key, as last loaded from their files.
#[derive(Debug)]
pub struct Certificate {
    files: TlsConfig,
    current: RwLock<Arc<CertifiedKey>>,
}

impl Certificate {
    /// Loads the certificate chain and key of `tls`.
    pub fn load(tls: &TlsConfig) -> Result<Arc<Self>, TlsError> {
        Ok(Arc::new(Self {
            current: RwLock::new(certified_key(tls)?),
            files: tls.clone(),
        }))
    }

    /// Loads the files again: new handshakes present what they hold now.
    /// On an error the certificate in use stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let loaded = certified_key(&self.files)?;
        *sync::write(&self.current) = loaded;
        Ok(())
    }

    /// A TLS acceptor presenting this certificate, reloads included.
    pub fn acceptor(self: &Arc<Self>) -> Result<TlsAcceptor, TlsError> {
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(self) as Arc<dyn ResolvesServerCert>);
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

impl ResolvesServerCert for Certificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&sync::read(&self.current)))
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificate chain and key of `tls`, checked to belong together.
fn certified_key(tls: &TlsConfig) -> Result<Arc<CertifiedKey>, TlsError> {
    let certs = load_certs(&tls.cert_file)?;
    let key = PrivateKeyDer::from_pem_file(&tls.key_file).map_err(|e| TlsError::Key {
        path: tls.key_file.display().to_string(),
        message: format!("no usable PEM private key ({e})"),
    })?;
    let certified = CertifiedKey::from_der(certs, key, &provider())?;
    Ok(Arc::new(certified))
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let error = |message: String| TlsError::Certificate {
        path: path.display().to_string(),
        message,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| error(format!("cannot read it ({e})")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| error(format!("not valid PEM ({e})")))?;
    if certs.is_empty() {
        return Err(error("holds no PEM certificate".into()));
    }
    Ok(certs)
}

/// A listener that yields connections whose TLS handshake has completed.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    accept_loop: JoinHandle<()>,
}

impl TlsListener {
    /// Wraps `listener`; handshakes start at once in the background.
    pub fn new(listener: TcpListener, acceptor: TlsAcceptor) -> io::Result<Self> {
        let local = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(MAX_HANDSHAKES);
        let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        let accept_loop = tokio::spawn(async move {
            loop {
                // Past MAX_HANDSHAKES connections in handshake (or handed
                // over and waiting for the server's connection cap), the
                // rest wait in the kernel's backlog, holding no descriptor.
                let Ok(permit) = handshakes.clone().acquire_owned().await else {
                    return;
                };
                let (stream, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        // Out of file descriptors, say: back off briefly.
                        tracing::warn!(error = %err, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if let Err(err) = stream.set_nodelay(true) {
                    tracing::debug!(%peer, error = %err, "cannot set TCP_NODELAY");
                }
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    let mut first = [0u8; 1];
                    if tokio::time::timeout(FIRST_BYTES_TIMEOUT, stream.peek(&mut first))
                        .await
                        .is_err()
                    {
                        tracing::debug!(%peer, "closed: silent before its tls hello");
                        return;
                    }
                    // The deadline covers the hand-over too: a connection
                    // the server has no room for is closed, not parked.
                    let handed = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
                        let tls = acceptor.accept(stream).await?;
                        let _ = tx.send((tls, peer)).await;
                        Ok::<(), io::Error>(())
                    });
                    match handed.await {
                        Ok(Ok(())) => {}
                        Ok(Err(err)) => {
                            tracing::debug!(%peer, error = %err, "tls handshake failed")
                        }
                        Err(_) => tracing::debug!(%peer, "tls handshake or hand-over timed out"),
                    }
                });
            }
        });
        Ok(Self {
            ready,
            local,
            accept_loop,
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(accepted) => accepted,
            // The accept loop only ends when this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;
    use tokio::time::Instant;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_gives_back_its_permit_at_the_first_bytes_deadline() {
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(rustls::server::ResolvesServerCertUsingSni::new()));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tls = TlsListener::new(listener, TlsAcceptor::from(Arc::new(config))).unwrap();
        let started = Instant::now();
        let mut silent = TcpStream::connect(tls.local).await.unwrap();
        let mut byte = [0u8; 1];
        let read = silent.read(&mut byte).await;
        assert!(matches!(read, Ok(0)) || read.is_err(), "{read:?}");
        let held = started.elapsed();
        assert!(
            (FIRST_BYTES_TIMEOUT..HANDSHAKE_TIMEOUT).contains(&held),
            "closed after {held:?}"
        );
    }
}
