//! `keyway agent --config FILE [--check]`: join the overlay from a device outside the clusters
//! (or carry an enforced pod's UDP) until SIGTERM or SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::agent::config::{AgentConfig, Mode};
use crate::agent::{self, PACKET_QUEUE, PacketIo, capture};

/// Join the keyway overlay from a device outside the clusters (a laptop, a VM).
///
/// The agent connects (QUIC, mutual TLS with the device's certificate from the overlay CA) to
/// every edge gateway of its zone and carries the device's traffic to overlay addresses through
/// them, where the same NetworkPolicies as for workloads decide. It configures the host itself
/// (root needed) and removes what it added on exit: a TUN device with the overlay address, routes
/// for the overlay prefixes, and an iptables chain KEYWAY_AGENT redirecting TCP to the overlay to
/// its listener. With no gateway connected nothing leaves: TCP is reset, UDP dropped.
///
/// `mode: pod` carries only an enforced pod's UDP (Envoy carries its TCP). See docs/agent.md.
///
/// Logs: RUST_LOG (default info), LOG_FORMAT=json|plain (default plain).
///
/// Example configuration (agent.yaml):
///
///   zone: zone-a
///   overlay_ip: 10.128.9.1
///   overlay_cidrs: [10.128.0.0/16]
///   gateways: ["192.0.2.10:15444", "192.0.2.11:15444"]
///   tls: {ca: ca.pem, cert: laptop.pem, key: laptop-key.pem}
///   admin: 127.0.0.1:15021
///
/// Example: keyway agent --config agent.yaml
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct AgentArgs {
    /// The configuration file (YAML).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Check the configuration and the TLS files, print the effective configuration, and exit
    /// without touching the host or the network.
    #[arg(long)]
    pub check: bool,
}

/// Runs the command.
pub fn run(args: AgentArgs) -> ExitCode {
    super::gateway_cmd::init_logging();
    let config = match AgentConfig::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("keyway: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = agent::edge::client_config(&config) {
        eprintln!("keyway: {}: {e}", args.config.display());
        return ExitCode::from(2);
    }
    let json = serde_json::to_string_pretty(&config).unwrap_or_default();
    if args.check {
        println!("{json}");
        return ExitCode::SUCCESS;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keyway: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(run_agent(config, json))
}

async fn run_agent(config: AgentConfig, json: String) -> ExitCode {
    tracing::info!(config = %serde_json::to_string(&config).unwrap_or_default(), "keyway agent starting");
    let tun = match capture::open_tun(&config) {
        Ok(t) => Arc::new(t),
        Err(e) => {
            eprintln!("keyway: {e}");
            return ExitCode::from(2);
        }
    };
    let mut cap = match capture::Capture::install(&config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("keyway: {e}");
            return ExitCode::from(2);
        }
    };
    let code = serve(&config, json, tun.clone()).await;
    // The device goes last: the routes on it are removed first, by name.
    cap.remove();
    drop(tun);
    code
}

async fn serve(config: &AgentConfig, json: String, tun: Arc<tun_rs::AsyncDevice>) -> ExitCode {
    let stop = CancellationToken::new();
    let tcp = if config.mode == Mode::Device {
        match tokio::net::TcpListener::bind(config.tcp_listen).await {
            Ok(l) => Some((l, Arc::new(agent::original_dst) as agent::OriginalDst)),
            Err(e) => {
                eprintln!("keyway: tcp_listen {}: cannot bind: {e}", config.tcp_listen);
                return ExitCode::from(2);
            }
        }
    } else {
        None
    };
    let (from_tx, from_host) = mpsc::channel(PACKET_QUEUE);
    let (to_host, mut to_rx) = mpsc::channel::<Vec<u8>>(PACKET_QUEUE);
    let reader = tun.clone();
    let mtu = usize::from(config.tun.mtu);
    let s1 = stop.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; mtu + 64];
        loop {
            let n = tokio::select! {
                r = reader.recv(&mut buf) => r,
                () = s1.cancelled() => return,
            };
            match n {
                Ok(n) => {
                    let _ = from_tx.try_send(buf[..n].to_vec());
                }
                Err(e) => {
                    tracing::error!(error = %e, "tun read");
                    return;
                }
            }
        }
    });
    let writer = tun.clone();
    tokio::spawn(async move {
        while let Some(p) = to_rx.recv().await {
            if let Err(e) = writer.send(&p).await {
                tracing::debug!(error = %e, "tun write");
            }
        }
    });
    let handle = match agent::start(config, tcp, PacketIo { from_host, to_host }).await {
        Ok(h) => h,
        Err(e) => {
            eprintln!("keyway: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(addr) = config.admin {
        match agent::admin::serve(addr, handle.metrics.clone(), json, stop.clone()).await {
            Ok(a) => tracing::info!(admin = %a, "admin listening"),
            Err(e) => {
                eprintln!("keyway: {e}");
                handle.shutdown().await;
                return ExitCode::from(2);
            }
        }
    }
    tracing::info!(tcp = ?handle.tcp_addr, quic = %handle.quic_addr, tun = %config.tun.name, "keyway agent running");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = async { match term.as_mut() { Some(s) => { s.recv().await; } None => std::future::pending().await } } => {
            tracing::info!("SIGTERM: stopping");
        }
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping"),
    }
    stop.cancel();
    handle.shutdown().await;
    ExitCode::SUCCESS
}
