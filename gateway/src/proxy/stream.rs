//! What the QUIC faces share (the overlay from peer gateways, the edge from agents): accepting
//! connections behind a Retry and a handshake limit, a flow header sent and its status read, a
//! flow header read, and the end of a flow that arrived on a stream.

use std::sync::Arc;
use std::time::Duration;

use keyway_policy::flow::{FlowHeader, Status, StatusCode as FlowStatus};

use super::accesslog::FlowLog;
use super::relay::{BoxIo, relay};
use super::{Proxy, Refusal};

/// How long the first bytes of a stream (header, status) may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Accepts QUIC connections on `endpoint` until it closes and runs `on_connection` for each
/// established one. A connection attempt from an address that has not proved it receives
/// packets there is answered with a QUIC Retry (a spoofed source never completes one); at most
/// `limits.max_handshakes` handshakes run at once, more are refused (the peer tries again).
pub async fn accept_loop<F, Fut>(proxy: Arc<Proxy>, endpoint: quinn::Endpoint, on_connection: F)
where
    F: Fn(Arc<Proxy>, quinn::Connection) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let handshakes = Arc::new(tokio::sync::Semaphore::new(proxy.config.limits.max_handshakes));
    let count = |outcome: &str| proxy.metrics.handshakes.with_label_values(&[outcome]).inc();
    while let Some(incoming) = endpoint.accept().await {
        if !incoming.remote_address_validated() {
            count("retry");
            if let Err(e) = incoming.retry() {
                tracing::debug!(error = %e, "quic retry not sent");
            }
            continue;
        }
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            count("refused-limit");
            proxy.metrics.limit_refusals.with_label_values(&["max_handshakes"]).inc();
            incoming.refuse();
            continue;
        };
        let p = proxy.clone();
        let on_connection = on_connection.clone();
        proxy.tasks.spawn(async move {
            let handshake = incoming.await;
            drop(permit);
            match handshake {
                Ok(conn) => {
                    p.metrics.handshakes.with_label_values(&["accepted"]).inc();
                    on_connection(p, conn).await;
                }
                Err(e) => {
                    p.metrics.handshakes.with_label_values(&["failed"]).inc();
                    tracing::warn!(error = %e, "quic handshake failed");
                }
            }
        });
    }
}

/// Sends `header` on a newly `opened` stream and reads the answer: the stream and the status.
pub async fn exchange(
    opened: Result<(quinn::SendStream, quinn::RecvStream), quinn::ConnectionError>,
    header: &[u8],
) -> Result<(quinn::SendStream, quinn::RecvStream, FlowStatus, String), String> {
    let (mut send, mut recv) = opened.map_err(|e| e.to_string())?;
    send.write_all(header).await.map_err(|e| e.to_string())?;
    let mut prefix = [0u8; 6];
    recv.read_exact(&mut prefix).await.map_err(|e| e.to_string())?;
    let (code, n) = Status::decode_prefix(&prefix).map_err(|e| e.to_string())?;
    let mut reason = vec![0u8; n];
    recv.read_exact(&mut reason).await.map_err(|e| e.to_string())?;
    Ok((send, recv, code, String::from_utf8_lossy(&reason).into_owned()))
}

pub async fn answer(send: &mut quinn::SendStream, code: FlowStatus, reason: &str) {
    let _ = send.write_all(&Status { code, reason: reason.to_owned() }.encode()).await;
}

pub async fn read_header(recv: &mut quinn::RecvStream) -> Result<FlowHeader, Refusal> {
    let read = async {
        let mut prefix = [0u8; 6];
        recv.read_exact(&mut prefix).await.map_err(|_| "flow-length")?;
        let n = FlowHeader::body_len(&prefix).map_err(|e| e.reason())?;
        let mut all = prefix.to_vec();
        all.resize(6 + n, 0);
        recv.read_exact(all.get_mut(6..).unwrap_or_default()).await.map_err(|_| "flow-length")?;
        FlowHeader::decode(&all).map_err(|e| e.reason())
    };
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, read).await {
        Ok(r) => r.map_err(Refusal::Header),
        Err(_) => Err(Refusal::Header("header-timeout")),
    }
}

/// Ends a flow that arrived on a stream (from a peer gateway or an agent): answers `accepted`'s
/// status and relays the flow, or answers its refusal; the access log records either.
pub async fn conclude(
    proxy: &Proxy,
    mut log: FlowLog,
    (mut send, recv): (quinn::SendStream, quinn::RecvStream),
    accepted: Result<(BoxIo, super::FlowPermit), Refusal>,
) {
    match accepted {
        Ok((upstream, permit)) => {
            answer(&mut send, FlowStatus::Connected, "").await;
            log.finish(Ok(()));
            log.set_active();
            let (up, down) = (log.bytes_up.clone(), log.bytes_down.clone());
            log.relayed(relay(tokio::io::join(recv, send), upstream, &up, &down, proxy.flow_idle_timeout()).await);
            drop(permit);
        }
        Err(r) => {
            // A stream that never sent a whole header gets no answer.
            if !matches!(r, Refusal::Header("header-timeout")) {
                let (code, reason) = r.flow_status();
                answer(&mut send, code, reason).await;
                let _ = send.finish();
            }
            log.finish(Err(r));
        }
    }
}
