//! A stand-in edge gateway for trying `keyway agent` by hand (docs/agent.md, "Trying it"): it
//! speaks the edge protocol (QUIC, ALPN keyway-edge/1, client certificates of the overlay CA)
//! but enforces nothing. TCP flows are answered `Connected` and their bytes echoed back; UDP
//! datagrams are echoed back with source and destination swapped; with a last argument PORT,
//! each agent that connects is sent one inbound TCP flow to its overlay address, port PORT, and
//! the answer is printed.
//!
//! cargo run -p keyway-gateway --example edge_echo -- LISTEN CA.pem GW.pem GW-KEY.pem [PORT]

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use keyway_policy::Protocol;
use keyway_policy::flow::{Datagram, FlowHeader, Status, StatusCode};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

fn server_config(ca: &str, cert: &str, key: &str) -> anyhow::Result<quinn::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca)? {
        roots.add(c?)?;
    }
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build()?;
    let chain = CertificateDer::pem_file_iter(cert)?.collect::<Result<Vec<_>, _>>()?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, PrivateKeyDer::from_pem_file(key)?)?;
    tls.alpn_protocols = vec![keyway_gateway::agent::edge::EDGE_ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    Ok(quinn::ServerConfig::with_crypto(Arc::new(quic)))
}

async fn echo_flow(mut send: quinn::SendStream, mut recv: quinn::RecvStream) -> anyhow::Result<()> {
    let mut prefix = [0u8; 6];
    recv.read_exact(&mut prefix).await?;
    let mut all = prefix.to_vec();
    all.resize(6 + FlowHeader::body_len(&prefix)?, 0);
    recv.read_exact(&mut all[6..]).await?;
    let h = FlowHeader::decode(&all)?;
    println!("tcp flow {} {} -> {}:{}", h.flow_id, h.src, h.dst, h.dst_port);
    send.write_all(&Status { code: StatusCode::Connected, reason: String::new() }.encode()).await?;
    tokio::io::copy(&mut recv, &mut send).await?;
    send.finish()?;
    Ok(())
}

async fn inbound(conn: &quinn::Connection, dst: std::net::IpAddr, port: u16) -> anyhow::Result<()> {
    let (mut send, mut recv) = conn.open_bi().await?;
    let h = FlowHeader {
        flow_id: 1,
        src: "10.128.2.20".parse()?,
        dst,
        dst_port: port,
        protocol: Protocol::Tcp,
        identity: "spiffe://cluster.local/ns/shop/sa/cart".into(),
        src_zone: "zone-b".into(),
        src_gateway: "gw-1".into(),
        verdict: "edge_echo".into(),
    };
    send.write_all(&h.encode()).await?;
    send.write_all(b"hello from the gateway\n").await?;
    send.finish()?;
    let answer = recv.read_to_end(1 << 20).await?;
    let (code, n) = Status::decode_prefix(answer.get(..6).context("short status")?.try_into()?)?;
    let rest = answer.get(6..).unwrap_or_default();
    let (reason, bytes) = rest.split_at(n.min(rest.len()));
    println!(
        "inbound flow to {dst}:{port}: {code:?} {:?}, got {:?}",
        String::from_utf8_lossy(reason),
        String::from_utf8_lossy(bytes)
    );
    Ok(())
}

async fn serve(conn: quinn::Connection, inbound_port: Option<u16>) {
    println!("agent connected from {}", conn.remote_address());
    let c = conn.clone();
    tokio::spawn(async move {
        while let Ok(d) = c.read_datagram().await {
            let Ok(d) = Datagram::decode(&d) else { continue };
            println!("udp {}:{} -> {}:{} {} bytes", d.src, d.src_port, d.dst, d.dst_port, d.payload.len());
            let back = Datagram { src: d.dst, dst: d.src, src_port: d.dst_port, dst_port: d.src_port, ..d };
            let _ = c.send_datagram(back.encode().into());
            if let Some(port) = inbound_port
                && let Err(e) = inbound(&c, back.dst, port).await
            {
                println!("inbound flow: {e:#}");
            }
        }
    });
    while let Ok((send, recv)) = conn.accept_bi().await {
        tokio::spawn(async move {
            if let Err(e) = echo_flow(send, recv).await {
                println!("tcp flow: {e:#}");
            }
        });
    }
    println!("agent gone: {:?}", conn.close_reason());
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, ca, cert, key, rest @ ..] = args.as_slice() else {
        anyhow::bail!("usage: edge_echo LISTEN CA.pem GW.pem GW-KEY.pem [PORT]");
    };
    let listen: SocketAddr = listen.parse()?;
    let inbound_port = rest.first().map(|p| p.parse()).transpose()?;
    let endpoint = quinn::Endpoint::server(server_config(ca, cert, key)?, listen)?;
    println!("edge_echo listening on {listen}");
    while let Some(incoming) = endpoint.accept().await {
        tokio::spawn(async move {
            match incoming.await {
                Ok(conn) => serve(conn, inbound_port).await,
                Err(e) => println!("handshake: {e}"),
            }
        });
    }
    Ok(())
}
