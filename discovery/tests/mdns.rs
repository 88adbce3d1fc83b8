//! mDNS for real between two responders on the loopback interface (the discovery crate's
//! level; the root crate's tests run whole gateways across network namespaces), and an
//! independent implementation (python-zeroconf) reading our advertisement.
//!
//! Other test runs on this machine may advertise `_clawmesh._udp.local.` on loopback at the
//! same time: every test uses its own random token, so its federation id filters them out.

use std::collections::HashSet;
use std::net::IpAddr;
use std::process::Command;
use std::time::{Duration, SystemTime};

use clawmesh_discovery::mdns::{Advertisement, Interfaces, Mdns, SERVICE_TYPE};
use clawmesh_discovery::{Discovery, DiscoveryConfig, Event, FederationId, Source};
use tokio::sync::mpsc;

/// A test gives each wait this long: mDNS announces within a second; only a real failure
/// reaches 15 s.
const WAIT: Duration = Duration::from_secs(15);

fn unique(tag: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{tag}-{}-{nanos}", std::process::id())
}

fn loopback() -> Mdns {
    Mdns::new(&Interfaces::Only(vec!["lo".into()])).expect("mDNS daemon on lo")
}

fn ad(name: &str, token: &str, port: u16) -> Advertisement {
    Advertisement {
        name: name.into(),
        region: "ap-northeast".into(),
        role: "gateway".into(),
        version: "0.1.0".into(),
        device_key: unique("key"),
        federation_id: Some(FederationId::from_token(token)),
        port,
        addrs: vec!["127.0.0.1".parse().unwrap()],
    }
}

async fn found_with_key(
    rx: &mut mpsc::Receiver<Event>,
    key: &str,
) -> clawmesh_discovery::Candidate {
    tokio::time::timeout(WAIT, async {
        loop {
            match rx.recv().await.expect("stream open") {
                Event::Found(c) if c.device_key.as_deref() == Some(key) => return *c,
                _ => continue,
            }
        }
    })
    .await
    .expect("our advertisement within the wait")
}

#[tokio::test]
async fn browse_finds_its_federation_and_ignores_others() {
    let token = unique("token");
    let ours = ad("osaka", &token, 4711);
    let theirs = ad("osaka", &unique("other-token"), 4712);
    let a = loopback();
    let reg_a = a.advertise(&ours).unwrap();
    let c_daemon = loopback();
    let _reg_c = c_daemon.advertise(&theirs).unwrap();

    let b = loopback();
    let own = ad("kyoto", &token, 4713);
    let _reg_b = b.advertise(&own).unwrap();
    let (d, mut rx) = Discovery::start(DiscoveryConfig {
        mdns: Some(b.clone()),
        federation: Some(FederationId::from_token(&token)),
        own_key: Some(own.device_key.clone()),
        ..Default::default()
    })
    .unwrap();

    let c = found_with_key(&mut rx, &ours.device_key).await;
    assert_eq!(c.source, Source::Mdns);
    assert_eq!(c.url.authority(), "127.0.0.1:4711");
    assert_eq!(c.name.as_deref(), Some("osaka"));
    assert_eq!(c.region.as_deref(), Some("ap-northeast"));
    assert_eq!(c.role.as_deref(), Some("gateway"));
    assert_eq!(c.version.as_deref(), Some("0.1.0"));
    assert_eq!(c.federation_id, Some(FederationId::from_token(&token)));
    assert_eq!(c.id, reg_a.fullname());

    // The other federation's gateway was seen and ignored; our own advertisement too.
    tokio::time::timeout(WAIT, async {
        while d.other_federation_seen() == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the other federation's advertisement is seen (and counted)");
    while let Ok(ev) = rx.try_recv() {
        if let Event::Found(c) = ev {
            assert_ne!(
                c.device_key.as_deref(),
                Some(theirs.device_key.as_str()),
                "another federation leaked"
            );
            assert_ne!(
                c.device_key.as_deref(),
                Some(own.device_key.as_str()),
                "our own advertisement leaked"
            );
        }
    }

    // Withdrawing the advertisement (a goodbye) loses the candidate.
    let id = reg_a.fullname().to_string();
    drop(reg_a);
    tokio::time::timeout(WAIT, async {
        loop {
            if let Event::Lost {
                source: Source::Mdns,
                id: lost,
            } = rx.recv().await.expect("open")
            {
                if lost == id {
                    return;
                }
            }
        }
    })
    .await
    .expect("the goodbye is seen");
    for m in [a, b, c_daemon] {
        m.shutdown();
    }
}

/// python-zeroconf, an mDNS implementation that is not ours, resolves our advertisement and
/// reads the TXT records. Installed by .ci/run (`pip install zeroconf`).
#[tokio::test]
async fn python_zeroconf_reads_our_advertisement() {
    let have = Command::new("python3")
        .args(["-c", "import zeroconf"])
        .status()
        .is_ok_and(|s| s.success());
    if !have {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "python3 with zeroconf is missing under CI (.ci/run installs it)"
        );
        eprintln!("SKIPPED python_zeroconf_reads_our_advertisement: python3 -c 'import zeroconf' fails; run `pip install zeroconf`");
        return;
    }
    let token = unique("token");
    let ad = ad("zeroconf-peer", &token, 4720);
    let m = loopback();
    let reg = m.advertise(&ad).unwrap();
    let out = tokio::task::spawn_blocking({
        let full = reg.fullname().to_string();
        move || {
            Command::new("timeout")
                .args(["30", "python3", "-c", ZEROCONF_SCRIPT, SERVICE_TYPE, &full])
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "zeroconf failed: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(
        v["browsed"], true,
        "zeroconf's browser listed the instance: {v}"
    );
    assert_eq!(v["port"], 4720);
    let addrs: HashSet<IpAddr> = v["addrs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().parse().unwrap())
        .collect();
    assert_eq!(addrs, HashSet::from(["127.0.0.1".parse().unwrap()]));
    let txt = &v["txt"];
    assert_eq!(txt["name"], "zeroconf-peer");
    assert_eq!(txt["region"], "ap-northeast");
    assert_eq!(txt["role"], "gateway");
    assert_eq!(txt["version"], "0.1.0");
    assert_eq!(txt["key"], ad.device_key.as_str());
    assert_eq!(
        txt["fed"],
        FederationId::from_token(&token).to_string().as_str()
    );
    drop(reg);
    m.shutdown();
}

/// Browses the type on loopback until the instance shows, then resolves it; prints JSON.
const ZEROCONF_SCRIPT: &str = r#"
import json, sys, threading
from zeroconf import Zeroconf, ServiceBrowser, IPVersion
ty, name = sys.argv[1], sys.argv[2]
zc = Zeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
seen = threading.Event()
def on_change(zeroconf, service_type, name, state_change):
    if name == sys.argv[2]:
        seen.set()
browser = ServiceBrowser(zc, ty, handlers=[on_change])
browsed = seen.wait(20)
info = zc.get_service_info(ty, name, timeout=8000)
if info is None:
    print(json.dumps({"browsed": browsed, "info": None}))
    zc.close()
    sys.exit(2)
txt = {k.decode(): (v.decode() if v is not None else None) for k, v in info.properties.items()}
print(json.dumps({"browsed": browsed, "port": info.port, "addrs": info.parsed_addresses(), "txt": txt, "server": info.server}))
zc.close()
"#;
