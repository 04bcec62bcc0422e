//! TCP flows: captured local connections out through a gateway, and flows a gateway delivers to
//! this device. One QUIC bidirectional stream per flow; bytes relayed both ways with half-close.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use keyway_policy::Protocol;
use keyway_policy::flow::{FlowHeader, Status, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::config::Mode;
use super::{OriginalDst, Shared};

/// How long a gateway may take to answer a flow header, and a local connect may take.
const STATUS_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Closes a TCP connection with a reset (RST), as a refused flow should look to the application.
fn reset(s: TcpStream) {
    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
    drop(s);
}

/// Accepts captured connections until `stop`.
pub(super) async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    orig: OriginalDst,
    tasks: tokio_util::task::TaskTracker,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = stop.cancelled() => return,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "tcp accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let dst = match orig(&stream) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "no original destination (not a captured connection): reset");
                shared.metrics.inc(&shared.metrics.tcp_outbound_refused);
                reset(stream);
                continue;
            }
        };
        let flow_id = shared.next_flow.fetch_add(1, Ordering::Relaxed);
        let span = tracing::info_span!("flow", flow_id, src = %shared.overlay_ip, %dst, dir = "outbound");
        tasks.spawn(outbound(shared.clone(), stream, dst, flow_id, stop.clone()).instrument(span));
    }
}

/// Reads a status (prefix and reason).
async fn read_status(recv: &mut quinn::RecvStream) -> Result<(StatusCode, String), String> {
    let mut prefix = [0u8; 6];
    recv.read_exact(&mut prefix).await.map_err(|e| e.to_string())?;
    let (code, n) = Status::decode_prefix(&prefix).map_err(|e| e.to_string())?;
    let mut reason = vec![0u8; n];
    recv.read_exact(&mut reason).await.map_err(|e| e.to_string())?;
    Ok((code, String::from_utf8_lossy(&reason).into_owned()))
}

/// One captured connection: through the first gateway that takes the header, or reset.
async fn outbound(shared: Arc<Shared>, stream: TcpStream, dst: SocketAddr, flow_id: u64, stop: CancellationToken) {
    let header = FlowHeader {
        flow_id,
        src: shared.overlay_ip,
        dst: dst.ip(),
        dst_port: dst.port(),
        protocol: Protocol::Tcp,
        identity: String::new(),
        src_zone: String::new(),
        src_gateway: String::new(),
        verdict: String::new(),
    }
    .encode();
    let mut opened = None;
    for conn in shared.gateways.connected() {
        let Ok((mut send, recv)) = conn.open_bi().await else { continue };
        if send.write_all(&header).await.is_ok() {
            opened = Some((send, recv, conn.remote_address()));
            break;
        }
    }
    let Some((send, mut recv, gateway)) = opened else {
        tracing::info!(reason = "no-gateway", "flow refused: no gateway connected (fail closed)");
        shared.metrics.inc(&shared.metrics.tcp_outbound_refused);
        return reset(stream);
    };
    match tokio::time::timeout(STATUS_TIMEOUT, read_status(&mut recv)).await {
        Ok(Ok((StatusCode::Connected, _))) => {
            shared.metrics.inc(&shared.metrics.tcp_outbound_opened);
            tracing::debug!(%gateway, "flow connected");
            relay(stream, send, recv, stop).await;
        }
        Ok(Ok((code, reason))) => {
            tracing::info!(%gateway, ?code, %reason, "flow refused by the gateway");
            shared.metrics.inc(&shared.metrics.tcp_outbound_refused);
            reset(stream);
        }
        Ok(Err(e)) => {
            tracing::info!(%gateway, error = %e, "flow refused: no status from the gateway");
            shared.metrics.inc(&shared.metrics.tcp_outbound_refused);
            reset(stream);
        }
        Err(_) => {
            tracing::info!(%gateway, "flow refused: the gateway did not answer in time");
            shared.metrics.inc(&shared.metrics.tcp_outbound_refused);
            reset(stream);
        }
    }
}

/// Copies `from` into `to` until end of stream, then half-closes `to`.
async fn pipe<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(mut from: R, mut to: W) -> std::io::Result<()> {
    tokio::io::copy(&mut from, &mut to).await?;
    to.shutdown().await
}

/// Relays bytes both ways until both directions end (or `stop`). An error on one direction
/// aborts the other: the QUIC stream is reset and the TCP connection reset.
async fn relay(stream: TcpStream, mut send: quinn::SendStream, mut recv: quinn::RecvStream, stop: CancellationToken) {
    let (tr, tw) = stream.into_split();
    let up = pipe(tr, &mut send);
    let down = pipe(&mut recv, tw);
    let both = async { tokio::try_join!(up, down) };
    let result = tokio::select! {
        r = both => r.map(|_| ()),
        () = stop.cancelled() => Err(std::io::Error::other("agent stopping")),
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "flow aborted");
        let _ = send.reset(0u32.into());
        let _ = recv.stop(0u32.into());
    }
}

/// A flow a gateway opened towards this device.
pub(super) async fn inbound(
    shared: Arc<Shared>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    stop: CancellationToken,
) {
    let header = async {
        let mut prefix = [0u8; 6];
        recv.read_exact(&mut prefix).await.map_err(|e| e.to_string())?;
        let n = FlowHeader::body_len(&prefix).map_err(|e| e.to_string())?;
        let mut all = prefix.to_vec();
        all.resize(6 + n, 0);
        recv.read_exact(&mut all[6..]).await.map_err(|e| e.to_string())?;
        FlowHeader::decode(&all).map_err(|e| e.to_string())
    };
    let h = match tokio::time::timeout(STATUS_TIMEOUT, header).await {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => return refuse(&shared, send, StatusCode::Refused, "bad-header", &e).await,
        Err(_) => return refuse(&shared, send, StatusCode::Refused, "header-timeout", "no header in time").await,
    };
    let span = tracing::info_span!("flow", flow_id = h.flow_id, src = %h.src, dst = %h.dst, dst_port = h.dst_port,
        identity = %h.identity, zone = %h.src_zone, dir = "inbound");
    async move {
        if shared.mode == Mode::Pod {
            return refuse(&shared, send, StatusCode::Refused, "pod-mode-udp-only", "").await;
        }
        if h.dst != shared.overlay_ip || h.protocol != Protocol::Tcp {
            return refuse(&shared, send, StatusCode::Refused, "not-this-device", "").await;
        }
        let target = SocketAddr::new(h.dst, h.dst_port);
        let local = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return refuse(&shared, send, StatusCode::Unreachable, "connect-refused", &e.to_string()).await;
            }
            Err(_) => return refuse(&shared, send, StatusCode::Unreachable, "connect-timeout", "").await,
        };
        let ok = Status { code: StatusCode::Connected, reason: String::new() }.encode();
        if send.write_all(&ok).await.is_err() {
            return;
        }
        shared.metrics.inc(&shared.metrics.tcp_inbound_opened);
        relay(local, send, recv, stop).await;
    }
    .instrument(span)
    .await;
}

async fn refuse(shared: &Shared, mut send: quinn::SendStream, code: StatusCode, reason: &str, detail: &str) {
    tracing::info!(?code, reason, detail, "inbound flow refused");
    shared.metrics.inc(&shared.metrics.tcp_inbound_refused);
    let _ = send.write_all(&Status { code, reason: reason.to_owned() }.encode()).await;
    let _ = send.finish();
}
