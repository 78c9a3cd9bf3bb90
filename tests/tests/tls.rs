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
    let acceptor = tls::acceptor(&files.config).unwrap();
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
    let err = tls::acceptor(&missing).err().unwrap();
    assert!(matches!(err, TlsError::Certificate { .. }), "{err}");
    assert!(
        err.to_string().contains("/nonexistent/coordinator.crt"),
        "{err}"
    );

    let swapped = TlsConfig {
        cert_file: files.config.key_file.clone(),
        key_file: files.config.cert_file.clone(),
    };
    let err = tls::acceptor(&swapped).err().unwrap();
    assert!(err.to_string().starts_with("tls.cert_file"), "{err}");

    let other = certificate();
    let mismatched = TlsConfig {
        cert_file: files.config.cert_file.clone(),
        key_file: other.config.key_file.clone(),
    };
    assert!(
        tls::acceptor(&mismatched).is_err(),
        "a key of another certificate is refused"
    );
}
