//! Two in-process engines in a fresh namespace pair, configured through the agent's `Datapath`
//! API (no wg(8)), with tunnel addresses 10.79.0.1 (a) and 10.79.0.2 (b) and a's endpoint for b
//! set (b learns a's by roaming). Shared by the engine test binaries; include after `netns`.

#![allow(dead_code)]

use std::sync::Arc;

use wiremesh_device::engine::{EngineConfig, UserspaceEngine};
use wiremesh_keyexchange::PrivateKey;
use wiremesh_wgctrl::datapath::{Datapath, DeviceSettings, PeerConfig};

use crate::netns::{Netns, Pair, UNDER_B, unique};

pub const T_A: &str = "10.79.0.1";
pub const T_B: &str = "10.79.0.2";

pub struct Two {
    pub a: Arc<UserspaceEngine>,
    pub b: Arc<UserspaceEngine>,
    pub key_a: PrivateKey,
    pub key_b: PrivateKey,
    pub pair: Pair,
}

/// An engine with two workers in `ns`, from the configuration `config` builds for `ifname`.
fn engine_in(
    ns: &Netns,
    ifname: &str,
    config: impl Fn(&str) -> EngineConfig,
) -> Arc<UserspaceEngine> {
    let mut config = config(ifname);
    config.threads = 2;
    ns.run(move || UserspaceEngine::create(config).expect("create engine"))
}

/// Both engines built from `config` (e.g. `EngineConfig::new`), keyed, peered and up.
pub fn two(config: impl Fn(&str) -> EngineConfig) -> Two {
    let pair = Pair::new();
    let a = engine_in(&pair.a, &unique("ea"), &config);
    let b = engine_in(&pair.b, &unique("eb"), &config);
    let key_a = PrivateKey::generate().expect("key");
    let key_b = PrivateKey::generate().expect("key");
    for (engine, key, port) in [(&a, &key_a, 53001), (&b, &key_b, 53002)] {
        engine
            .configure(&DeviceSettings {
                private_key: Some(key.clone()),
                listen_port: Some(port),
                fwmark: None,
            })
            .expect("configure");
    }
    let mut peer_b = PeerConfig::new(key_b.public_key());
    peer_b.endpoint = Some(format!("{UNDER_B}:53002").parse().expect("ep"));
    peer_b.allowed_ips = vec![format!("{T_B}/32").parse().expect("net")];
    a.set_peer(&peer_b).expect("set peer");
    let mut peer_a = PeerConfig::new(key_a.public_key());
    peer_a.allowed_ips = vec![format!("{T_A}/32").parse().expect("net")];
    b.set_peer(&peer_a).expect("set peer");
    for (ns, engine, ip) in [(&pair.a, &a, T_A), (&pair.b, &b, T_B)] {
        // The engine never touches addresses: the owner does, as the agent does.
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", engine.ifname()]);
        ns.ip(&["link", "set", engine.ifname(), "up"]);
    }
    Two {
        a,
        b,
        key_a,
        key_b,
        pair,
    }
}
