//! UDP: packets from the host into QUIC datagrams to a gateway, and datagrams from a gateway back
//! into packets for the host. Nothing that is not this agent's own UDP leaves.

use std::sync::Arc;

use bytes::Bytes;
use keyway_policy::flow::Datagram;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::metrics::DropReason;
use super::packet::{self, Refused};

/// Carries packets from the host until `stop` or the host side closes.
pub(super) async fn outbound_loop(
    shared: Arc<Shared>,
    mut from_host: mpsc::Receiver<Vec<u8>>,
    stop: CancellationToken,
) {
    loop {
        let p = tokio::select! {
            p = from_host.recv() => p,
            () = stop.cancelled() => return,
        };
        let Some(p) = p else { return };
        outbound(&shared, &p);
    }
}

/// One packet from the host: to a gateway, or dropped and counted.
fn outbound(shared: &Shared, p: &[u8]) {
    let m = &shared.metrics;
    let d = match packet::parse(p) {
        Ok(d) => d,
        Err(Refused::Malformed) => return m.count_drop(DropReason::Malformed),
        Err(Refused::NotUdp | Refused::Fragment) => return m.count_drop(DropReason::NotUdp),
    };
    if d.src != shared.overlay_ip {
        tracing::debug!(src = %d.src, dst = %d.dst, "udp: source is not this agent's overlay address: dropped");
        return m.count_drop(DropReason::SpoofedSource);
    }
    let bytes = Bytes::from(d.encode());
    let mut too_large = false;
    for conn in shared.gateways.connected() {
        if conn.max_datagram_size().is_none_or(|max| bytes.len() > max) {
            too_large = true;
            continue;
        }
        match conn.send_datagram(bytes.clone()) {
            Ok(()) => {
                m.inc(&m.udp_sent);
                return;
            }
            Err(quinn::SendDatagramError::TooLarge) => too_large = true,
            Err(_) => {}
        }
    }
    m.count_drop(if too_large { DropReason::TooLarge } else { DropReason::NoGateway });
}

/// One datagram from a gateway: written to the host as a packet, or dropped and counted.
pub(super) fn inbound(shared: &Shared, bytes: &[u8]) {
    let m = &shared.metrics;
    let Ok(d) = Datagram::decode(bytes) else { return m.count_drop(DropReason::Malformed) };
    if d.dst != shared.overlay_ip {
        return m.count_drop(DropReason::NotThisDevice);
    }
    let Some(p) = packet::build(&d) else { return m.count_drop(DropReason::Malformed) };
    match shared.to_host.try_send(p) {
        Ok(()) => m.inc(&m.udp_received),
        Err(_) => m.count_drop(DropReason::QueueFull),
    }
}
