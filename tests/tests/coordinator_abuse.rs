//! Bad input on the node endpoint: auth failures, bad versions, malformed,
//! unexpected and oversize frames. Each gets its documented error frame and
//! close code, and the coordinator keeps serving other nodes.

use lingua_coordinator::config::Config;
use lingua_shared::MAX_FRAME_BYTES;
use lingua_shared::close::CloseCode;
use lingua_shared::protocol::{ErrorCode, VersionRange};
use lingua_shared::{Message, decode};
use lingua_tests::{Received, TestCoordinator, TestNode, registration, test_config, with_token};

const TOKEN: &str = "a-long-node-token-for-tests";

async fn expect_error(node: &mut TestNode, code: ErrorCode) -> String {
    match node.recv().await {
        Received::Message(Message::Error(error)) => {
            assert_eq!(error.code, code, "{}", error.message);
            error.message
        }
        other => panic!("expected an {code:?} error frame, got {other:?}"),
    }
}

/// A node that registers and answers: proof the coordinator still serves.
async fn still_serves(coordinator: &TestCoordinator, token: Option<&str>) {
    let mut register = registration("healthy", &["zh"], &["en"]);
    if let Some(token) = token {
        register = with_token(register, token);
    }
    let (node, _) = TestNode::register(&coordinator.ws_url(), register).await;
    node.close().await;
    let (status, _) = coordinator.get("/healthz").await;
    assert_eq!(status, 200);
}

fn token_config() -> Config {
    Config {
        node_tokens: vec![TOKEN.into()],
        ..test_config()
    }
}

#[tokio::test]
async fn missing_and_wrong_tokens_close_with_4001() {
    let redis = lingua_tests::redis().await;
    let coordinator = TestCoordinator::start(&redis, token_config()).await;
    for register in [
        registration("intruder", &["zh"], &["en"]),
        with_token(
            registration("intruder", &["zh"], &["en"]),
            "a-long-but-wrong-token!!",
        ),
    ] {
        let mut node = TestNode::connect(&coordinator.ws_url()).await;
        node.send(&Message::Register(register)).await;
        expect_error(&mut node, ErrorCode::Unauthorized).await;
        assert_eq!(node.closed().await, CloseCode::Unauthorized.code());
    }
    let (status, _) = coordinator.get("/v1/nodes/intruder").await;
    assert_eq!(status, 404, "a refused node leaves no trace");
    still_serves(&coordinator, Some(TOKEN)).await;
    coordinator.stop().await;
}

#[tokio::test]
async fn no_common_protocol_version_closes_with_4002() {
    let redis = lingua_tests::redis().await;
    let coordinator = TestCoordinator::start(&redis, test_config()).await;
    let mut register = registration("future", &["zh"], &["en"]);
    register.protocol = VersionRange { min: 7, max: 9 };
    let mut node = TestNode::connect(&coordinator.ws_url()).await;
    node.send(&Message::Register(register)).await;
    let message = expect_error(&mut node, ErrorCode::UnsupportedVersion).await;
    assert!(message.contains("7..=9"), "{message}");
    assert_eq!(node.closed().await, CloseCode::UnsupportedVersion.code());
    still_serves(&coordinator, None).await;
    coordinator.stop().await;
}

#[tokio::test]
async fn a_first_frame_that_is_not_a_valid_register_closes_with_4003() {
    let redis = lingua_tests::redis().await;
    let coordinator = TestCoordinator::start(&redis, test_config()).await;
    let cases = [
        (
            r#"{"type":"heartbeat","seq":1,"capacity":{"free_slots":{}}}"#,
            ErrorCode::UnexpectedMessage,
        ),
        (
            r#"{"type":"register","node_id":"x"#,
            ErrorCode::MalformedFrame,
        ),
        (
            r#"{"type":"register","node_id":"BAD ID"}"#,
            ErrorCode::InvalidMessage,
        ),
        (r#"{"type":"teleport"}"#, ErrorCode::UnknownType),
    ];
    for (frame, code) in cases {
        let mut node = TestNode::connect(&coordinator.ws_url()).await;
        node.send_raw(frame.into()).await;
        expect_error(&mut node, code).await;
        assert_eq!(
            node.closed().await,
            CloseCode::RegistrationRequired.code(),
            "{frame}"
        );
    }
    still_serves(&coordinator, None).await;
    coordinator.stop().await;
}

#[tokio::test]
async fn a_socket_that_never_registers_is_closed_with_4003() {
    let redis = lingua_tests::redis().await;
    let coordinator = TestCoordinator::start(&redis, test_config()).await;
    let mut node = TestNode::connect(&coordinator.ws_url()).await;
    assert_eq!(node.closed().await, CloseCode::RegistrationRequired.code());
    coordinator.stop().await;
}

#[tokio::test]
async fn bad_frames_get_error_frames_then_repeated_abuse_closes_with_1008() {
    let redis = lingua_tests::redis().await;
    let coordinator = TestCoordinator::start(&redis, test_config()).await;
    let (mut abuser, _) = TestNode::register(
        &coordinator.ws_url(),
        registration("abuser", &["zh"], &["en"]),
    )
    .await;
    let (bystander, _) = TestNode::register(
        &coordinator.ws_url(),
        registration("bystander", &["en"], &["ja"]),
    )
    .await;
    let bad = [
        ("not json at all".to_owned(), ErrorCode::MalformedFrame),
        ("[1,2,3]".to_owned(), ErrorCode::MalformedFrame),
        (r#"{"no_type":true}"#.to_owned(), ErrorCode::InvalidMessage),
        (
            r#"{"type":"warp_drive"}"#.to_owned(),
            ErrorCode::UnknownType,
        ),
        (
            r#"{"type":"heartbeat","seq":"many"}"#.to_owned(),
            ErrorCode::InvalidMessage,
        ),
        (
            r#"{"type":"capacity","free_slots":{"Not A Kind":1}}"#.to_owned(),
            ErrorCode::InvalidMessage,
        ),
        (
            r#"{"type":"job_cancel","job_id":"j","attempt":1}"#.to_owned(),
            ErrorCode::UnexpectedMessage,
        ),
    ];
    for (frame, code) in &bad {
        abuser.send_raw(frame.clone()).await;
        expect_error(&mut abuser, *code).await;
    }
    for _ in bad.len()..10 {
        if !abuser.try_send_raw("}{".into()).await {
            break;
        }
    }
    assert_eq!(abuser.closed().await, CloseCode::PolicyViolation.code());
    let (_, view) = coordinator.get("/v1/nodes/bystander").await;
    assert_eq!(view["state"], "ready", "other nodes are unaffected");
    bystander.close().await;
    still_serves(&coordinator, None).await;
    coordinator.stop().await;
}

#[tokio::test]
async fn an_oversize_frame_closes_with_1009() {
    let redis = lingua_tests::redis().await;
    let coordinator = TestCoordinator::start(&redis, test_config()).await;
    let (mut node, _) = TestNode::register(
        &coordinator.ws_url(),
        registration("bloated", &["zh"], &["en"]),
    )
    .await;
    let huge = format!(
        r#"{{"type":"drain","reason":"{}"}}"#,
        "x".repeat(MAX_FRAME_BYTES)
    );
    assert!(
        decode(huge.as_bytes()).is_err(),
        "the frame is over the limit"
    );
    let _ = node.try_send_raw(huge).await;
    assert_eq!(node.closed().await, CloseCode::TooLarge.code());
    still_serves(&coordinator, None).await;
    coordinator.stop().await;
}
