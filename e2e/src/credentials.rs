//! Tokens and tickets minted by the tests themselves, as a filter or a gateway would seal them,
//! from the epoch secrets file of a bed (to test refusals: forged, stolen, old-epoch, replayed).

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use keyway_gateway::secrets::{EpochEntry, EpochSecrets};
use keyway_policy::Protocol;
use keyway_policy::auth::{TicketClaims, TokenClaims};

/// Now, unix ms (the gateways' clock).
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or_default()
}

fn entry(secrets: &EpochSecrets, epoch: Option<u32>, now_ms: u64) -> anyhow::Result<&EpochEntry> {
    match epoch {
        Some(ep) => secrets.entries().iter().find(|e| e.epoch == ep).with_context(|| format!("no epoch {ep}")),
        None => secrets.current(now_ms).context("no current epoch"),
    }
}

fn nonce() -> anyhow::Result<[u8; 12]> {
    let mut nonce = [0u8; 12];
    getrandom::fill(&mut nonce)?;
    Ok(nonce)
}

/// A token of the workload `identity` at overlay address `src` for `dst`, sealed with `epoch`
/// (default: the current one) and issued at `issued_at_ms`.
pub fn token(
    secrets: &Path,
    identity: &str,
    src: IpAddr,
    dst: SocketAddr,
    epoch: Option<u32>,
    issued_at_ms: u64,
) -> anyhow::Result<String> {
    let s = EpochSecrets::load(secrets)?;
    let e = entry(&s, epoch, now_ms())?;
    let key = e.secret.workload_key(identity, src, e.epoch)?;
    Ok(TokenClaims {
        epoch: e.epoch,
        src,
        dst: dst.ip(),
        dst_port: dst.port(),
        protocol: Protocol::Tcp,
        issued_at_ms,
        nonce: nonce()?,
    }
    .seal(&key))
}

/// A ticket (the current epoch) for `dst`, naming `src` and `src_identity`, sealed with the ticket
/// key of `recipient` (its identity and first overlay address), as its zone's gateway seals it.
pub fn ticket(
    secrets: &Path,
    recipient: (&str, IpAddr),
    src: IpAddr,
    src_identity: &str,
    dst: SocketAddr,
) -> anyhow::Result<String> {
    let now = now_ms();
    let s = EpochSecrets::load(secrets)?;
    let e = entry(&s, None, now)?;
    let key = e.secret.ticket_key(recipient.0, recipient.1, e.epoch)?;
    Ok(TicketClaims {
        epoch: e.epoch,
        src,
        dst: dst.ip(),
        dst_port: dst.port(),
        protocol: Protocol::Tcp,
        issued_at_ms: now,
        nonce: nonce()?,
        src_identity: src_identity.to_owned(),
    }
    .seal(&key)?)
}
