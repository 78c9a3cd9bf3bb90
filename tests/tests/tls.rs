//! TLS on the coordinator's listener: agents over `wss://`, the API over
//! `https://`, with a certificate the test generates.

use std::path::PathBuf;
use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use lingua_coordinator::config::TlsConfig;
use lingua_coordinator::tls::{self, TlsError};
use lingua_shared::Message;
use lingua_tests::{TestCoordinator, registration, test_config};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio_tungstenite::Connector;
use tokio_tungstenite::tungstenite::Message as WsMessage;

struct Files {
    _dir: tempfile::TempDir,
    config: TlsConfig,
    cert_pem: String,
}

fn certificate() -> Files {
    let generated =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert_file = dir.path().join("coordinator.crt");
    let key_file = dir.path().join("coordinator.key");
    let cert_pem = generated.cert.pem();
    std::fs::write(&cert_file, &cert_pem).unwrap();
    std::fs::write(&key_file, generated.signing_key.serialize_pem()).unwrap();
    Files {
        _dir: dir,
        config: TlsConfig {
            cert_file,
            key_file,
        },
        cert_pem,
    }
}

fn client_config(cert_pem: &str) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    Arc::new(config)
}

#[tokio::test]
async fn nodes_register_over_wss_and_the_api_answers_https() {
    let files = certificate();
    let redis = lingua_tests::redis().await;
    let acceptor = tls::Certificate::load(&files.config)
        .unwrap()
        .acceptor()
        .unwrap();
    let coordinator = TestCoordinator::start_tls(&redis, test_config(), Some(acceptor)).await;
    let port = coordinator.addr.port();

    let url = format!("wss://localhost:{port}/v1/node");
    let connector = Connector::Rustls(client_config(&files.cert_pem));
    let (mut ws, _) =
        tokio_tungstenite::connect_async_tls_with_config(url, None, false, Some(connector))
            .await
            .expect("wss handshake with the generated certificate");
    let register = Message::Register(registration("secure", &["zh"], &["en"]));
    ws.send(WsMessage::text(lingua_shared::encode(&register)))
        .await
        .unwrap();
    let ack = ws.next().await.unwrap().unwrap();
    assert!(matches!(
        lingua_shared::decode(ack.to_text().unwrap().as_bytes()),
        Ok(Message::RegisterAck(_))
    ));

    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(files.cert_pem.as_bytes()).unwrap())
        .build()
        .unwrap();
    let view: serde_json::Value = client
        .get(format!("https://localhost:{port}/v1/nodes/secure"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(view["state"], "ready");

    // Plain ws:// to a TLS listener fails, and the listener keeps serving.
    assert!(
        tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/v1/node"))
            .await
            .is_err()
    );
    let health = client
        .get(format!("https://localhost:{port}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    drop(ws);
    coordinator.stop().await;
}

#[test]
fn unusable_certificate_files_are_explained() {
    let files = certificate();
    let missing = TlsConfig {
        cert_file: PathBuf::from("/nonexistent/coordinator.crt"),
        key_file: files.config.key_file.clone(),
    };
    let err = tls::Certificate::load(&missing).err().unwrap();
    assert!(matches!(err, TlsError::Certificate { .. }), "{err}");
    assert!(
        err.to_string().contains("/nonexistent/coordinator.crt"),
        "{err}"
    );

    let swapped = TlsConfig {
        cert_file: files.config.key_file.clone(),
        key_file: files.config.cert_file.clone(),
    };
    let err = tls::Certificate::load(&swapped).err().unwrap();
    assert!(err.to_string().starts_with("tls.cert_file"), "{err}");

    let other = certificate();
    let mismatched = TlsConfig {
        cert_file: files.config.cert_file.clone(),
        key_file: other.config.key_file.clone(),
    };
    assert!(
        tls::Certificate::load(&mismatched).is_err(),
        "a key of another certificate is refused"
    );
}

/// The certificate `addr` presents to a client trusting only `cert_pem`,
/// and the open connection; `None` when the handshake fails (the server
/// presents another certificate, or does not serve yet).
async fn handshake(
    addr: std::net::SocketAddr,
    cert_pem: &str,
) -> Option<(
    CertificateDer<'static>,
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
)> {
    let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    let connector = tokio_rustls::TlsConnector::from(client_config(cert_pem));
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let stream = connector.connect(name, tcp).await.ok()?;
    let presented = stream.get_ref().1.peer_certificates()?[0].clone();
    Some((presented.into_owned(), stream))
}

/// Sends `GET /healthz` on an open connection and reads the status line.
async fn healthz_on(stream: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut buffer = vec![0; 4096];
    let n = stream.read(&mut buffer).await.unwrap();
    String::from_utf8_lossy(&buffer[..n])
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn sighup_reloads_the_certificate_without_dropping_connections() {
    let first = certificate();
    let redis = lingua_tests::redis().await;
    let addr = lingua_tests::fleet::free_local_addr();
    let config = format!(
        "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        first.config.cert_file.display(),
        first.config.key_file.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("coordinator.toml");
    std::fs::write(&path, config).unwrap();
    let binary = lingua_tests::fleet::workspace_binary("lingua-coordinator").unwrap();
    let mut child = tokio::process::Command::new(binary)
        .args([
            "--config",
            path.to_str().unwrap(),
            "--listen",
            &addr.to_string(),
        ])
        .args(lingua_tests::RedisBackend::coordinator_args(&redis))
        .env("LINGUA_LOG", "error")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let (presented, mut open) = lingua_tests::eventually("the coordinator to serve TLS", || {
        handshake(addr, &first.cert_pem)
    })
    .await;
    assert_eq!(
        presented.as_ref(),
        CertificateDer::from_pem_slice(first.cert_pem.as_bytes())
            .unwrap()
            .as_ref()
    );
    assert_eq!(healthz_on(&mut open).await, "HTTP/1.1 200 OK");

    // A new certificate in the same files, then SIGHUP.
    let second = certificate();
    std::fs::copy(&second.config.cert_file, &first.config.cert_file).unwrap();
    std::fs::copy(&second.config.key_file, &first.config.key_file).unwrap();
    let pid = child.id().unwrap().to_string();
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    assert!(hup.success());
    let renewed = CertificateDer::from_pem_slice(second.cert_pem.as_bytes()).unwrap();
    lingua_tests::eventually("new handshakes to present the new certificate", || async {
        let (presented, _) = handshake(addr, &second.cert_pem).await?;
        (presented.as_ref() == renewed.as_ref()).then_some(())
    })
    .await;
    assert_eq!(
        healthz_on(&mut open).await,
        "HTTP/1.1 200 OK",
        "the connection opened before the reload still works"
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP did not stop the coordinator"
    );
    child.kill().await.unwrap();
}
