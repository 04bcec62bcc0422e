//! The key service, on the tunnel listener (HTTP/2 over mutual TLS): `GET /v1/keys?ip=<overlay
//! address>` answers a sidecar the key bundle of its own workload. Who asks is its client
//! certificate's SPIFFE id (the mesh's word, not an address); the source address must also be
//! the workload's (a second factor). Every refusal is the same answer, so probing the service
//! tells nothing about the inventory.

use std::net::{IpAddr, SocketAddr};

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use keyway_policy::engine::Peer;

use crate::admin::{json, text};
use crate::proxy::Proxy;

/// The one answer to every key request that is not served: the same status and body whether the
/// address is no workload's, another zone's, or a workload's asked from another address.
fn keys_refused() -> Response<Full<Bytes>> {
    text(
        StatusCode::FORBIDDEN,
        "keys refused: ask the gateway of your zone, with the workload's mesh certificate and from its own address, for its own overlay address\n",
    )
}

/// Answers a key request on the tunnel listener from `peer`, whose client certificate says
/// `client`: the bundle of the workload at `?ip=` when that workload is of this zone, its identity
/// is `client`'s and `peer` is one of its addresses (unless `key_service.allow_any_source`);
/// the one refusal otherwise.
pub fn answer(ctx: &Proxy, peer: SocketAddr, client: &str, query: &str) -> Response<Full<Bytes>> {
    let outcome = |o: &str| ctx.metrics.key_requests.with_label_values(&[o]).inc();
    let param = keyway_policy::wire::KEY_SERVICE_IP_PARAM;
    let ip = query
        .split('&')
        .find_map(|kv| kv.strip_prefix(param).and_then(|r| r.strip_prefix('=')))
        .and_then(|v| v.parse::<IpAddr>().ok());
    let Some(ip) = ip else {
        outcome("bad-request");
        return text(StatusCode::BAD_REQUEST, format!("expected ?{param}=<the workload's overlay address>\n"));
    };
    let engine = ctx.state.engine();
    let Peer::Workload(w) = engine.peer_for(ip) else {
        outcome("unknown-workload");
        return keys_refused();
    };
    let Some(workload) = engine.inventory().workloads.get(w) else {
        outcome("unknown-workload");
        return keys_refused();
    };
    if workload.zone.as_deref() != Some(ctx.config.zone.as_str()) {
        outcome("other-zone");
        return keys_refused();
    }
    let identity = workload.identity(&ctx.config.trust_domain);
    if identity != client {
        outcome("wrong-identity");
        return keys_refused();
    }
    let from = peer.ip().to_canonical();
    let own = workload.sidecar_ips.iter().chain(workload.overlay_ips.iter()).any(|a| a.to_canonical() == from);
    if !own && !ctx.config.key_service.allow_any_source {
        outcome("wrong-source");
        return keys_refused();
    }
    let key_ip = workload.overlay_ips.first().copied().unwrap_or(ip);
    let holder = crate::secrets::Holder { identity: &identity, overlay_ip: ip, key_ip, zone: &ctx.config.zone };
    let (refresh_ms, activation_ms) = (ctx.config.key_service.refresh_ms, ctx.config.activation_ms());
    match crate::secrets::key_bundle_activating(&ctx.state.secrets(), ctx.now_ms(), holder, refresh_ms, activation_ms) {
        Ok(bundle) => {
            outcome("ok");
            json(StatusCode::OK, &serde_json::to_value(bundle).unwrap_or_default())
        }
        Err(e) => {
            outcome("error");
            text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n"))
        }
    }
}
