//! Pairing beyond one frame and one page, with a real gateway: a gateway joining with more
//! paired devices than one link-up event and one listing page hold hands them all over, and
//! `devices list` pages through them, each device exactly once.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clawmesh_federation::endpoint::{self, TransportOptions};
use clawmesh_federation::health::HealthConfig;
use clawmesh_federation::identity::{DeviceIdentity, PublicKey};
use clawmesh_federation::mesh::{Admission, Mesh, MeshConfig};
use clawmesh_federation::pairing::{Registry, MAX_PAGE};
use clawmesh_federation::rpc::{BoxFuture, Caller, CallerKind, Handler};
use clawmesh_federation::store::Store;
use clawmesh_federation::wire::{Hello, PairingRecord, Refusal, RefusalCode, Request, WireError};
use common::*;
use quinn::Connection;

/// More devices than one page (10 000) and than two link-up events (5 000 each).
const DEVICES: usize = MAX_PAGE + 2_500;

struct NoMethods;

impl Handler for NoMethods {
    fn handle(&self, _: Caller, req: Request) -> BoxFuture<Result<String, WireError>> {
        Box::pin(async move { Err(WireError::new("UNAVAILABLE", req.method)) })
    }
}

struct NoClients;

impl Admission for NoClients {
    fn admit(&self, _: &PublicKey, _: SocketAddr, _: &Hello) -> Result<CallerKind, Refusal> {
        Err(Refusal {
            code: RefusalCode::UnknownPeer,
            message: "no clients".into(),
            retryable: false,
        })
    }

    fn connected(&self, conn: Connection, _: Caller, _: Hello) {
        conn.close(0u32.into(), b"no clients");
    }
}

#[test]
fn a_joining_gateway_hands_over_more_devices_than_a_frame_and_the_list_pages_them_once() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tmp = tempfile::tempdir().unwrap();
    let gw_dir = tmp.path().join("hub");
    let mut gw = Gw::spawn(
        &gw_dir,
        &[
            "--primary",
            "--name",
            "hub",
            "--token",
            "scale-token",
            "--health-interval",
            "1000",
        ],
    );
    let hub: SocketAddr = gw.wait_ready().parse().unwrap();

    // The joining gateway has decided on every device before it links: the link-up exchange
    // carries them all (several events), as it would after a partition.
    let peer_dir = tmp.path().join("peer");
    std::fs::create_dir_all(&peer_dir).unwrap();
    let store = Store::open(&peer_dir).unwrap();
    let registry = Registry::open(store.clone()).unwrap();
    // Two more, paired under one name: a selector by that name is ambiguous.
    let keys: Vec<PublicKey> = (0..DEVICES + 2)
        .map(|_| DeviceIdentity::ephemeral().public_key())
        .collect();
    let records: Vec<PairingRecord> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| PairingRecord {
            key: *k,
            approved: i % 10 != 0 || i >= DEVICES,
            changed_at_ms: 1_700_000_000_000,
            name: if i >= DEVICES {
                "twin".into()
            } else {
                format!("dev-{i}")
            },
            role: "node".into(),
            platform: "linux".into(),
            meta: "{}".into(),
            token: None,
        })
        .collect();
    registry.apply(&records).unwrap();

    let rt = tokio::runtime::Runtime::new().unwrap();
    let _mesh = rt.block_on(async {
        let identity = DeviceIdentity::ephemeral();
        let ep = endpoint::bind(
            &identity,
            "127.0.0.1:0".parse().unwrap(),
            &TransportOptions::default(),
        )
        .unwrap();
        let advertise = ep.local_addr().unwrap().to_string();
        let mesh = Mesh::start(
            MeshConfig {
                name: "peer".into(),
                region: None,
                primary: false,
                join: Some(hub),
                token: Some("scale-token".into()),
                advertise,
                health: HealthConfig {
                    interval: Duration::from_millis(1000),
                    unhealthy_threshold: 3,
                },
                software: "pairing_scale test".into(),
            },
            &identity,
            ep,
            store,
            Arc::new(NoMethods),
            Arc::new(NoClients),
        )
        .unwrap();
        mesh.attach_pairing(registry);
        mesh
    });

    // Every page through the CLI, until the hub has them all: each device exactly once.
    let read_all = || {
        let mut seen = HashSet::new();
        let mut after: Option<String> = None;
        let mut pages = 0;
        loop {
            let mut args = vec!["devices", "list", "--json"];
            if let Some(a) = &after {
                args.extend(["--after", a.as_str()]);
            }
            let page = cli_json(&gw_dir, &args);
            pages += 1;
            let paired = page["paired"].as_array().cloned().unwrap_or_default();
            let revoked = page["revoked"].as_array().cloned().unwrap_or_default();
            assert!(paired.len() + revoked.len() <= MAX_PAGE, "page too long");
            for d in paired.iter().chain(&revoked) {
                let id = d["deviceId"].as_str().unwrap().to_string();
                assert!(seen.insert(id.clone()), "{id} listed twice");
            }
            match page["next"].as_str() {
                Some(n) => after = Some(n.to_string()),
                None => return (seen, pages),
            }
        }
    };
    let want: HashSet<String> = keys.iter().map(|k| k.device_id().to_string()).collect();
    let mut got = (HashSet::new(), 0);
    let merged = wait_until(Duration::from_secs(60), || {
        got = read_all();
        got.0 == want
    });
    assert!(
        merged,
        "the hub lists {} of {} devices\n{}",
        got.0.len(),
        want.len(),
        log_tail(&gw_dir, 30)
    );
    assert_eq!(got.1, 2, "{DEVICES} devices are two pages");
    // A small page size pages too, and a bad limit is refused with the reason.
    let first = cli_json(&gw_dir, &["devices", "list", "--json", "--limit", "3"]);
    assert_eq!(
        first["paired"].as_array().unwrap().len() + first["revoked"].as_array().unwrap().len(),
        3
    );
    assert!(first["next"].is_string());
    let out = cli(&gw_dir, &["devices", "list", "--limit", "0"]);
    assert!(!out.status.success());

    // Selectors among the paired devices, by index at the gateway: a name without regard to
    // case, an id prefix, the full id; a revoked device is no node; a name two devices share
    // is an error naming both, never one of them picked.
    let id7 = keys[7].device_id().to_string();
    for sel in ["dev-7", "DEV-7", &id7[..16], id7.as_str()] {
        let d = cli_json(&gw_dir, &["nodes", "describe", sel, "--json"]);
        assert_eq!(d["nodeId"], id7.as_str(), "{sel}");
        assert_eq!(d["displayName"], "dev-7", "{sel}");
        assert_eq!(
            (d["paired"].as_bool(), d["connected"].as_bool()),
            (Some(true), Some(false))
        );
    }
    let out = cli(&gw_dir, &["nodes", "describe", "dev-10"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("unknown node"),
        "{err}"
    );
    let out = cli(&gw_dir, &["nodes", "describe", "TWIN"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("ambiguous"), "{err}");
    for k in &keys[DEVICES..] {
        let id = k.device_id().to_string();
        assert!(err.contains(&id[..12]), "{id} not named: {err}");
    }
    // An invoke by name reaches the device's row: paired, attached nowhere.
    let out = nodes_invoke(&gw_dir, "Dev-7", "system.which", r#"{"bins":["sh"]}"#, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("paired but not attached"),
        "{err}"
    );
    drop(rt);
    let _ = &mut gw;
}
