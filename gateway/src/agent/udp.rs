//! UDP: packets from the host into QUIC datagrams to a gateway, and datagrams from a gateway back
//! into packets for the host. Nothing that is not this agent's own UDP leaves.
//!
//! A flow's datagrams keep to one gateway: the one its last datagram came from, else the one its
//! first went to. A gateway tracks the flows it carries (a reply is let through because it saw the
//! request), so a reply sent to another replica would be a new flow there, decided as one.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use keyway_policy::flow::Datagram;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::metrics::DropReason;
use super::packet::{self, Refused};

/// How long a flow keeps its gateway after its last datagram either way (the gateways forget an
/// idle flow after 30 s by default).
const STICKY_IDLE: Duration = Duration::from_secs(120);
/// Past this many flows, idle ones are forgotten at the next new flow.
const STICKY_SWEEP: usize = 4096;

/// The gateway connection of each UDP flow (local address, remote address).
#[derive(Debug, Default)]
pub(crate) struct Sticky {
    flows: Mutex<HashMap<(SocketAddr, SocketAddr), (quinn::Connection, Instant)>>,
}

impl Sticky {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(SocketAddr, SocketAddr), (quinn::Connection, Instant)>> {
        self.flows.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The open connection the flow uses, if any.
    fn get(&self, key: (SocketAddr, SocketAddr)) -> Option<quinn::Connection> {
        let mut flows = self.lock();
        let (conn, last) = flows.get_mut(&key)?;
        if conn.close_reason().is_some() {
            return None;
        }
        *last = Instant::now();
        Some(conn.clone())
    }

    /// The flow uses `conn` from now on.
    fn set(&self, key: (SocketAddr, SocketAddr), conn: &quinn::Connection) {
        let mut flows = self.lock();
        if flows.len() >= STICKY_SWEEP && !flows.contains_key(&key) {
            flows.retain(|_, (c, last)| c.close_reason().is_none() && last.elapsed() < STICKY_IDLE);
        }
        flows.insert(key, (conn.clone(), Instant::now()));
    }
}

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
    let key = (SocketAddr::new(d.src, d.src_port), SocketAddr::new(d.dst, d.dst_port));
    let mut too_large = false;
    let sticky = shared.sticky.get(key);
    for conn in sticky.into_iter().chain(shared.gateways.connected()) {
        if conn.max_datagram_size().is_none_or(|max| bytes.len() > max) {
            too_large = true;
            continue;
        }
        match conn.send_datagram(bytes.clone()) {
            Ok(()) => {
                shared.sticky.set(key, &conn);
                m.inc(&m.udp_sent);
                return;
            }
            Err(quinn::SendDatagramError::TooLarge) => too_large = true,
            Err(_) => {}
        }
    }
    m.count_drop(if too_large { DropReason::TooLarge } else { DropReason::NoGateway });
}

/// One datagram from a gateway (on `conn`): written to the host as a packet, or dropped and
/// counted.
pub(super) fn inbound(shared: &Shared, conn: &quinn::Connection, bytes: &[u8]) {
    let m = &shared.metrics;
    let Ok(d) = Datagram::decode(bytes) else { return m.count_drop(DropReason::Malformed) };
    if d.dst != shared.overlay_ip {
        return m.count_drop(DropReason::NotThisDevice);
    }
    shared.sticky.set((SocketAddr::new(d.dst, d.dst_port), SocketAddr::new(d.src, d.src_port)), conn);
    let Some(p) = packet::build(&d) else { return m.count_drop(DropReason::Malformed) };
    match shared.to_host.try_send(p) {
        Ok(()) => m.inc(&m.udp_received),
        Err(_) => m.count_drop(DropReason::QueueFull),
    }
}
