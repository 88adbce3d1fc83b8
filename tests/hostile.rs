//! Hostile and broken peers against a real gateway: garbage datagrams, a TLS client with the
//! wrong ALPN, malformed and oversized frames, missing tokens. Each is refused with a clear
//! error, and the gateway and its mesh carry on undisturbed.

mod common;

use std::sync::Arc;
use std::time::Duration;

use clawmesh_federation::endpoint::{self, TransportOptions};
use clawmesh_federation::frame;
use clawmesh_federation::handshake::{self, HandshakeError};
use clawmesh_federation::identity::DeviceIdentity;
use clawmesh_federation::rpc::{self, CallError};
use clawmesh_federation::wire::{HelloReply, HelloRole, OperatorHello, RefusalCode};
use common::*;

type Session = (
    quinn::Endpoint,
    quinn::Connection,
    Result<(), HandshakeError>,
);

async fn operator(addr: std::net::SocketAddr, token: Option<&str>) -> Session {
    operator_scoped(addr, token, vec![]).await
}

async fn operator_scoped(
    addr: std::net::SocketAddr,
    token: Option<&str>,
    scopes: Vec<String>,
) -> Session {
    let id = DeviceIdentity::ephemeral();
    let ep = endpoint::client(&id, addr, &TransportOptions::default()).unwrap();
    let conn = endpoint::dial(&ep, addr, Duration::from_secs(5))
        .await
        .unwrap();
    let hello = handshake::hello(
        "test",
        1,
        HelloRole::Operator(OperatorHello {
            client: "hostile-test".into(),
            token: token.map(str::to_string),
            scopes,
        }),
    );
    let r = handshake::send_hello(&conn, &hello).await.map(|_| ());
    (ep, conn, r)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_peers_are_refused_and_the_mesh_is_undisturbed() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path().join("tokyo");
    let mut tokyo = Gw::spawn(
        &t,
        &[
            "--name",
            "tokyo",
            "--primary",
            "--token",
            "tok",
            "--health-interval",
            "200",
        ],
    );
    let addr_s = tokyo.wait_ready();
    let addr: std::net::SocketAddr = addr_s.parse().unwrap();
    let b = tmp.path().join("beijing");
    let mut beijing = Gw::spawn(
        &b,
        &[
            "--name",
            "beijing",
            "--join",
            &format!("quic://{addr_s}"),
            "--token",
            "tok",
            "--health-interval",
            "200",
        ],
    );
    beijing.wait_ready();
    let (t2, b2) = (t.clone(), b.clone());
    assert!(
        tokio::task::spawn_blocking(move || wait_until(Duration::from_secs(15), || sees_healthy(
            &t2,
            &["tokyo", "beijing"]
        )))
        .await
        .unwrap()
    );

    // 1. Garbage datagrams of every size.
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for i in 0..2000usize {
        let len = (i * 37) % 1500 + 1;
        let junk: Vec<u8> = (0..len).map(|j| (i * 31 + j * 7) as u8).collect();
        let _ = sock.send_to(&junk, addr).await;
    }

    // 2. A TLS client with another ALPN and no device certificate.
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(clawmesh_federation::raw_key::verifier())
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h3".to_vec()];
    let qc = quinn::crypto::rustls::QuicClientConfig::try_from(cfg).unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(qc)));
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        ep.connect(addr, "clawmesh").unwrap(),
    )
    .await;
    assert!(
        matches!(r, Ok(Err(_))),
        "a non-clawmesh TLS client must be refused: {r:?}"
    );

    // 3. Operator without a token: refused with a clear reason.
    let (_ep, _c, r) = operator(addr, None).await;
    match r {
        Err(HandshakeError::Refused { refusal, .. }) => {
            assert_eq!(refusal.code, RefusalCode::BadToken);
            assert!(
                refusal.message.contains("token required"),
                "{}",
                refusal.message
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // ...and with a wrong one.
    let (_ep, _c, r) = operator(addr, Some("nope")).await;
    assert!(matches!(r, Err(HandshakeError::Refused { .. })), "{r:?}");

    // 4. A device-certified client sending a garbage hello and an oversized length prefix.
    for junk in [
        vec![0xde, 0xad, 0xbe, 0xef, 1, 2, 3],
        vec![0xff, 0xff, 0xff, 0xff, 0],
    ] {
        let id = DeviceIdentity::ephemeral();
        let ep = endpoint::client(&id, addr, &TransportOptions::default()).unwrap();
        let conn = endpoint::dial(&ep, addr, Duration::from_secs(5))
            .await
            .unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&junk).await.unwrap();
        let _ = send.finish();
        let reply: Result<Option<HelloReply>, _> = tokio::time::timeout(
            Duration::from_secs(5),
            frame::read_frame(&mut recv, 64 * 1024),
        )
        .await
        .expect("no hang");
        match reply {
            Ok(Some(HelloReply::Refused(r))) => assert_eq!(r.code, RefusalCode::BadHello),
            other => assert!(other.is_err() || matches!(other, Ok(None)), "{other:?}"),
        }
    }

    // 5. An admitted operator sending a malformed request and an oversized one.
    let (_ep, conn, r) = operator(addr, Some("tok")).await;
    r.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&[0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    let _ = send.finish();
    let resp: Option<clawmesh_federation::wire::Response> =
        frame::read_frame(&mut recv, 1 << 20).await.unwrap();
    let err = resp.unwrap().result.unwrap_err();
    assert_eq!(err.code, "INVALID_REQUEST");
    assert!(err.message.contains("malformed request"));
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    let _ = send.finish();
    let resp: Option<clawmesh_federation::wire::Response> =
        frame::read_frame(&mut recv, 1 << 20).await.unwrap();
    assert!(resp
        .unwrap()
        .result
        .unwrap_err()
        .message
        .contains("exceeds"));
    // Bad params JSON and an unknown method get classic errors.
    match rpc::call(
        &conn,
        "health",
        "{not json".into(),
        0,
        Duration::from_secs(5),
    )
    .await
    {
        Err(CallError::Remote(e)) => assert!(e.message.contains("invalid params"), "{e:?}"),
        other => panic!("{other:?}"),
    }
    match rpc::call(
        &conn,
        "no.such.method",
        "{}".into(),
        0,
        Duration::from_secs(5),
    )
    .await
    {
        Err(CallError::Remote(e)) => assert_eq!(e.message, "unknown method: no.such.method"),
        other => panic!("{other:?}"),
    }
    // A valid request still works on the same connection.
    let ok = rpc::call(&conn, "health", "{}".into(), 0, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(ok.contains("\"ok\":true"));

    // An operator holding only operator.read is refused writes, naming the missing scope.
    let (_ep, conn, r) = operator_scoped(addr, Some("tok"), vec!["operator.read".into()]).await;
    r.unwrap();
    assert!(rpc::call(
        &conn,
        "gateway.status",
        "{}".into(),
        0,
        Duration::from_secs(5)
    )
    .await
    .is_ok());
    match rpc::call(
        &conn,
        "node.invoke",
        r#"{"nodeId":"x","command":"system.which"}"#.into(),
        0,
        Duration::from_secs(5),
    )
    .await
    {
        Err(CallError::Remote(e)) => {
            assert_eq!(e.code, "FORBIDDEN");
            assert_eq!(e.message, "missing scope: operator.write");
        }
        other => panic!("{other:?}"),
    }
    match rpc::call(
        &conn,
        "device.pair.list",
        "{}".into(),
        0,
        Duration::from_secs(5),
    )
    .await
    {
        Err(CallError::Remote(e)) => assert_eq!(e.message, "missing scope: operator.pairing"),
        other => panic!("{other:?}"),
    }

    // The gateway is alive, logged its refusals, and the mesh is still healthy.
    let log = tokyo.log_text();
    assert!(log.contains("refused connection"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
    let (t2, b2c) = (t.clone(), b2.clone());
    assert!(tokio::task::spawn_blocking(move || {
        sees_healthy(&t2, &["tokyo", "beijing"]) && sees_healthy(&b2c, &["tokyo", "beijing"])
    })
    .await
    .unwrap());
    drop(beijing);
}
