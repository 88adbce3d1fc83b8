//! Tailnet discovery against a fake tailscaled that follows the LocalAPI contract
//! (tests/fixtures/tailscale/CONTRACT.md): the fake's front door, the client's status and whois,
//! selection by tag and host, a peer going offline, NeedsLogin, an absent socket.

#[path = "support/fake_tailscaled.rs"]
mod fake_tailscaled;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use clawmesh_discovery::localapi::{LocalApi, LocalApiError};
use clawmesh_discovery::tailnet::{select, Selector, TailnetConfig, TailnetState};
use clawmesh_discovery::{Discovery, DiscoveryConfig, Event, Source};
use fake_tailscaled::FakeTailscaled;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// A test gives each wait this long: far above the few milliseconds a local poll takes, so
/// only a real failure reaches it.
const WAIT: Duration = Duration::from_secs(10);

async fn raw(path: &Path, request: &str) -> String {
    let mut s = tokio::net::UnixStream::connect(path).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    String::from_utf8(out).unwrap()
}

fn body(resp: &str) -> &str {
    resp.split_once("\r\n\r\n").unwrap().1
}

#[tokio::test]
async fn fake_front_door_follows_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeTailscaled::start(&dir.path().join("tailscaled.sock")).await;
    let p = fake.path();
    for bad in [
        "GET /localapi/v0/status HTTP/1.1\r\nHost: localhost\r\n\r\n",
        "GET /localapi/v0/status HTTP/1.1\r\nHost: local-tailscaled.sock:80\r\n\r\n",
        "GET /localapi/v0/status HTTP/1.1\r\nHost: local-tailscaled.sock\r\nReferer: http://evil\r\n\r\n",
        "GET /localapi/v0/status HTTP/1.1\r\nHost: local-tailscaled.sock\r\nOrigin: http://evil\r\n\r\n",
    ] {
        let r = raw(p, bad).await;
        assert!(r.starts_with("HTTP/1.1 403"), "{r}");
        assert_eq!(body(&r), "invalid localapi request\n");
        assert!(r.contains("text/plain; charset=utf-8"));
        assert!(!r.contains("Tailscale-Version"), "refused before the handler");
    }
    let ok = "Host: local-tailscaled.sock\r\n\r\n";
    let r = raw(p, &format!("GET /localapi/v0/status HTTP/1.1\r\n{ok}")).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(
        r.contains("Transfer-Encoding: chunked"),
        "large body chunked as Go does"
    );
    assert!(r.contains("Tailscale-Version: "));
    let r = raw(
        p,
        "GET /localapi/v0/whois?proto=&addr=100.64.0.20:41234 HTTP/1.1\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200"), "empty Host passes: {r}");
    assert_eq!(
        body(&r),
        fake_tailscaled::WHOIS_NODE_SG_1,
        "fixture bytes, no trailing newline"
    );
    for (q, status, msg) in [
        ("", 400, "missing 'addr' parameter\n"),
        (
            "addr=nodekey:zz",
            400,
            "invalid nodekey in 'addr' parameter\n",
        ),
        (
            "addr=fd7a:115c:a1e0:0:0:0:e201:5514:41234",
            400,
            "invalid 'addr' parameter\n",
        ),
        ("addr=100.64.0.99", 404, "no match for IP:port\n"),
    ] {
        let r = raw(p, &format!("GET /localapi/v0/whois?{q} HTTP/1.1\r\n{ok}")).await;
        assert!(r.starts_with(&format!("HTTP/1.1 {status}")), "{q}: {r}");
        assert_eq!(body(&r), msg, "{q}");
    }
    let r = raw(p, &format!("GET /localapi/v0/nope HTTP/1.1\r\n{ok}")).await;
    assert_eq!(body(&r), "404 page not found\n");
    let r = raw(
        p,
        &format!("GET /localapi/v0/status HTTP/1.1\r\nX-Tailscale-Reason: !!\r\n{ok}"),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
}

#[tokio::test]
async fn client_reads_status_and_whois() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeTailscaled::start(&dir.path().join("tailscaled.sock")).await;
    let api = LocalApi::new(fake.path());
    let st = api.status().await.unwrap();
    assert_eq!(st.backend_state, "Running");
    assert_eq!(st.magic_dns_suffix, "tail1234.ts.net");
    let peers = st.peer.as_ref().unwrap();
    assert_eq!(peers.len(), 4);
    assert!(peers
        .values()
        .any(|p| p.host_name == "gw-frankfurt" && !p.online));

    let sg: SocketAddr = "100.64.0.20:41234".parse().unwrap();
    let w = api.whois(sg).await.unwrap();
    assert_eq!(w.node.computed_name, "node-sg-1");
    assert!(w.node.is_tagged());
    assert_eq!(w.user_profile.login_name, "tagged-devices");
    assert_eq!(
        w.user_profile.id, 28410639225127093,
        "an id above 2^53 kept exact"
    );
    assert!(w.cap_map.unwrap().contains_key("example.com/cap/clawmesh"));

    // An IPv4-mapped address is unmapped before the call; alice has no tags and no caps.
    let alice: SocketAddr = "[::ffff:100.64.0.10]:5555".parse().unwrap();
    let w = api.whois(alice).await.unwrap();
    assert!(!w.node.is_tagged());
    assert_eq!(w.user_profile.login_name, "alice@example.com");
    assert!(w.cap_map.is_none());

    let v6: SocketAddr = "[fd7a:115c:a1e0::b301:9c22]:1".parse().unwrap();
    assert_eq!(
        api.whois(v6).await.unwrap().node.key,
        "nodekey:574757256d99219d4f805aa8092754858053c21ae5388dfc901ab802ad00f204"
    );

    let unknown: SocketAddr = "100.64.0.99:1".parse().unwrap();
    assert!(matches!(
        api.whois(unknown).await,
        Err(LocalApiError::PeerNotFound)
    ));

    fake.needs_login();
    assert!(
        matches!(api.whois(sg).await, Err(LocalApiError::PeerNotFound)),
        "no netmap, no match"
    );
    let st = api.status().await.unwrap();
    assert_eq!(st.backend_state, "NeedsLogin");
    assert!(st.peer.is_none());
}

#[tokio::test]
async fn absent_socket_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let api = LocalApi::new(dir.path().join("no-such.sock"));
    let e = api.status().await.unwrap_err();
    assert!(matches!(e, LocalApiError::NotRunning { .. }), "{e:?}");
    let line = e.to_string();
    assert!(
        line.contains("no-such.sock") && line.contains("tailscaled"),
        "{line}"
    );
}

#[test]
fn selection_by_tag_and_host() {
    let st = serde_json::from_str(fake_tailscaled::STATUS_RUNNING).unwrap();
    let sel = |tags: &[&str], hosts: &[&str]| {
        let s = Selector {
            tags: tags.iter().map(|t| t.to_string()).collect(),
            hosts: hosts.iter().map(|t| t.to_string()).collect(),
        };
        let mut names: Vec<String> = select(&st, &s, 18789)
            .into_iter()
            .map(|c| c.name.unwrap())
            .collect();
        names.sort();
        names
    };
    assert_eq!(
        sel(&["tag:clawmesh-gateway"], &[]),
        ["gw-beijing"],
        "frankfurt is offline"
    );
    assert_eq!(
        sel(&["tag:clawmesh-node"], &["laptop-alice"]),
        ["laptop-alice", "node-sg-1"]
    );
    assert_eq!(
        sel(&[], &["Alices-MacBook-Pro"]),
        ["laptop-alice"],
        "OS host name differs from the DNS label"
    );
    assert_eq!(sel(&[], &["gw-beijing.tail1234.ts.net."]), ["gw-beijing"]);
    assert_eq!(sel(&[], &[]).len(), 3, "no selector: every online peer");
    assert!(sel(&["tag:other"], &[]).is_empty());

    let c = select(
        &st,
        &Selector {
            tags: vec!["tag:clawmesh-gateway".into()],
            hosts: vec![],
        },
        18789,
    )
    .pop()
    .unwrap();
    assert_eq!(c.source, Source::Tailnet);
    assert_eq!(
        c.url.authority(),
        "100.64.0.2:18789",
        "IPv4 tailnet address, federation port"
    );
    assert_eq!(c.dns_name.as_deref(), Some("gw-beijing.tail1234.ts.net"));
    assert_eq!(
        c.id,
        "nodekey:574757256d99219d4f805aa8092754858053c21ae5388dfc901ab802ad00f204"
    );

    let logged_out = serde_json::from_str(fake_tailscaled::STATUS_NEEDSLOGIN).unwrap();
    assert!(select(&logged_out, &Selector::default(), 1).is_empty());
}

fn tailnet_config(api: LocalApi, poll: Duration) -> DiscoveryConfig {
    DiscoveryConfig {
        tailnet: Some(TailnetConfig {
            api,
            selector: Selector {
                tags: vec!["tag:clawmesh-gateway".into()],
                hosts: vec![],
            },
            port: 18789,
            poll,
        }),
        ..Default::default()
    }
}

async fn next(rx: &mut mpsc::Receiver<Event>) -> Event {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("an event")
        .expect("stream open")
}

async fn state_becomes(d: &Discovery, want: impl Fn(&TailnetState) -> bool) -> TailnetState {
    let mut w = d.watch_tailnet();
    let s = tokio::time::timeout(WAIT, w.wait_for(|s| want(s)))
        .await
        .expect("state")
        .expect("watch");
    s.clone()
}

#[tokio::test]
async fn peers_come_and_go_with_the_status() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeTailscaled::start(&dir.path().join("tailscaled.sock")).await;
    // A short poll so the test sees changes quickly; the product polls every 5 s.
    let (d, mut rx) = Discovery::start(tailnet_config(
        LocalApi::new(fake.path()),
        Duration::from_millis(50),
    ))
    .unwrap();
    let Event::Found(c) = next(&mut rx).await else {
        panic!("want Found")
    };
    assert_eq!(c.name.as_deref(), Some("gw-beijing"));
    assert_eq!(c.source, Source::Tailnet);
    state_becomes(&d, |s| {
        matches!(
            s,
            TailnetState::Running {
                selected: 1,
                online: 3
            }
        )
    })
    .await;

    // A new tagged gateway joins the tailnet, with no restart.
    fake.add_peer(
        "gw-osaka",
        "100.64.0.4".parse().unwrap(),
        &["tag:clawmesh-gateway"],
        0x44,
    );
    let Event::Found(c) = next(&mut rx).await else {
        panic!("want Found")
    };
    assert_eq!(
        (c.name.as_deref(), c.url.authority().as_str()),
        (Some("gw-osaka"), "100.64.0.4:18789")
    );

    // beijing goes offline.
    fake.set_online("gw-beijing", false);
    assert_eq!(
        next(&mut rx).await,
        Event::Lost {
            source: Source::Tailnet,
            id: "nodekey:574757256d99219d4f805aa8092754858053c21ae5388dfc901ab802ad00f204".into()
        }
    );
    // ...and comes back.
    fake.set_online("gw-beijing", true);
    let Event::Found(c) = next(&mut rx).await else {
        panic!("want Found")
    };
    assert_eq!(c.name.as_deref(), Some("gw-beijing"));
    drop(d);
}

#[tokio::test]
async fn needs_login_is_a_state_polled_with_backoff() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeTailscaled::start(&dir.path().join("tailscaled.sock")).await;
    let (d, mut rx) = Discovery::start(tailnet_config(
        LocalApi::new(fake.path()),
        Duration::from_millis(20),
    ))
    .unwrap();
    assert!(matches!(next(&mut rx).await, Event::Found(_)));
    fake.needs_login();
    // Logging out loses every peer.
    assert!(matches!(next(&mut rx).await, Event::Lost { .. }));
    let s = state_becomes(&d, |s| matches!(s, TailnetState::NeedsLogin { .. })).await;
    let line = s.to_string();
    assert!(
        line.contains("NeedsLogin")
            && line.contains("https://login.tailscale.com/a/7c3f9e21d8a04b"),
        "{line}"
    );
    // Backoff doubles from 20 ms: in the next 1.5 s at most ~7 polls, where a fixed 20 ms
    // poll would make ~75. Load can only lower the count, so this bound cannot flake.
    let before = fake.requests();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let polls = fake.requests() - before;
    assert!(
        polls <= 8,
        "{polls} polls in 1.5 s while logged out: not backing off"
    );
}

#[tokio::test]
async fn absent_socket_then_daemon_starts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tailscaled.sock");
    let (d, mut rx) = Discovery::start(tailnet_config(
        LocalApi::new(&path),
        Duration::from_millis(20),
    ))
    .unwrap();
    let s = state_becomes(&d, |s| matches!(s, TailnetState::NotRunning(_))).await;
    assert!(s.to_string().contains("not reachable"), "{s}");
    assert!(rx.try_recv().is_err(), "no candidates without a daemon");
    // tailscaled comes up: the poller notices without a restart.
    let mut fake = FakeTailscaled::start(&path).await;
    let Event::Found(c) = next(&mut rx).await else {
        panic!("want Found")
    };
    assert_eq!(c.name.as_deref(), Some("gw-beijing"));
    // ...and goes away again: its peers are lost, the state says so.
    fake.stop();
    assert!(matches!(next(&mut rx).await, Event::Lost { .. }));
    state_becomes(&d, |s| matches!(s, TailnetState::NotRunning(_))).await;
}
