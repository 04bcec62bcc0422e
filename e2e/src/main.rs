//! `keyway-e2e`: the programs the end-to-end harness runs inside network namespaces (the sample
//! app, the probe, the impairment relay, a tiny HTTP client) and the demo.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// keyway's end-to-end harness and demo.
#[derive(Debug, Parser)]
#[command(name = "keyway-e2e", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the demo: a three-zone overlay from samples/shop, the traffic matrix, metrics and
    /// access logs, then tear everything down. Needs root.
    Demo,
    /// The sample app: on each port, a banner line naming the workload, then echo.
    App {
        /// The workload it stands for (`ns/name`).
        #[arg(long)]
        workload: String,
        /// Comma-separated ports.
        #[arg(long, value_delimiter = ',')]
        ports: Vec<u16>,
    },
    /// Try connections; one JSON result per target on stdout.
    Probe {
        /// Keep the connection open this long after the payload, sending a line every 200 ms
        /// and checking its echo (for tests that change things under an open flow).
        #[arg(long, default_value_t = 0)]
        hold_ms: u64,
        /// Payload to send and expect echoed after the banner.
        #[arg(long, default_value_t = 0)]
        bytes: u64,
        /// Timeout per step, ms.
        #[arg(long, default_value_t = 3000)]
        timeout_ms: u64,
        /// Targets `ip:port`.
        targets: Vec<SocketAddr>,
    },
    /// UDP relay with delay and loss from a control file (`delay_ms loss_percent`).
    Relay {
        /// The control file.
        #[arg(long)]
        control: PathBuf,
        /// `listen=target` pairs.
        pairs: Vec<String>,
    },
    /// An HTTP/2 CONNECT as a sidecar's tcp_proxy sends it (to a gateway's tunnel or a sidecar's
    /// keyway inbound port), with extra headers; prints the status and `x-keyway-deny-reason`, and
    /// on 200 reads the destination app's banner.
    Connect {
        /// Where to connect (`ip:port`).
        #[arg(long)]
        to: SocketAddr,
        /// The CONNECT authority (`ip:port` of the destination).
        #[arg(long)]
        authority: String,
        /// `name=value` headers.
        #[arg(long = "header")]
        headers: Vec<String>,
        #[command(flatten)]
        tls: Tls,
    },
    /// A key request as a sidecar sends it to its gateway's key service (on the tunnel port);
    /// prints the status, then the body.
    Keys {
        /// The gateway's tunnel (`ip:port`).
        #[arg(long)]
        to: SocketAddr,
        /// The overlay address whose keys are asked for.
        #[arg(long)]
        ip: std::net::IpAddr,
        #[command(flatten)]
        tls: Tls,
    },
    /// Send one UDP datagram to each target and wait for its echo; one JSON result per target.
    Udp {
        /// How long to wait for each echo, ms.
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
        /// Targets `ip:port`.
        targets: Vec<SocketAddr>,
    },
    /// Send one ICMP echo request (raw socket, root) to each target and one SCTP INIT to port
    /// `sctp_port` of each; one JSON result per probe.
    Raw {
        /// How long to wait for each echo reply, ms.
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
        /// The SCTP destination port.
        #[arg(long, default_value_t = 9)]
        sctp_port: u16,
        /// Target addresses.
        targets: Vec<std::net::IpAddr>,
    },
    /// Capture every TCP segment crossing this network namespace (AF_PACKET, ETH_P_ALL, as a
    /// pod with CAP_NET_RAW on a bridge CNI can) into a file of JSON lines, until a segment to
    /// `stop_port` passes or `max_seconds` have passed; the file exists once the capture runs.
    Sniff {
        /// The capture file.
        #[arg(long)]
        out: PathBuf,
        /// A TCP segment to this port ends the capture (the caller's marker).
        #[arg(long)]
        stop_port: u16,
        /// The longest capture, seconds.
        #[arg(long, default_value_t = 120)]
        max_seconds: u64,
    },
    /// HTTP/1.1 GET `host:port/path`; prints the status, then the body.
    Get {
        /// `host:port/path`.
        url: String,
    },
}

/// The mesh certificate to speak with: all three files, or none for cleartext HTTP/2.
#[derive(Debug, clap::Args)]
struct Tls {
    /// Mesh certificate chain (PEM); with --key and --ca: mutual TLS.
    #[arg(long, requires_all = ["key", "ca"])]
    cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, requires_all = ["cert", "ca"])]
    key: Option<PathBuf>,
    /// The mesh root (PEM).
    #[arg(long, requires_all = ["cert", "key"])]
    ca: Option<PathBuf>,
}

impl Tls {
    fn load(self) -> anyhow::Result<Option<keyway_gateway::mesh::MeshTls>> {
        match (self.cert, self.key, self.ca) {
            (Some(cert), Some(key), Some(ca)) => {
                Ok(Some(keyway_gateway::mesh::MeshTls::load(&keyway_gateway::config::MeshFiles { ca, cert, key })?))
            }
            _ => Ok(None),
        }
    }
}

use keyway_e2e::mesh::Speak;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keyway-e2e: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: anyhow::Result<ExitCode> = rt.block_on(async move {
        match cli.command {
            Command::Demo => keyway_e2e::demo::run().await,
            Command::App { workload, ports } => {
                keyway_e2e::app::serve(workload, ports).await?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Probe { hold_ms, bytes, timeout_ms, targets } => {
                let t = Duration::from_millis(timeout_ms);
                let hold = Duration::from_millis(hold_ms);
                let tasks: Vec<_> =
                    targets.into_iter().map(|a| tokio::spawn(keyway_e2e::app::probe_held(a, bytes, t, hold))).collect();
                for task in tasks {
                    println!("{}", serde_json::to_string(&task.await?)?);
                }
                Ok(ExitCode::SUCCESS)
            }
            Command::Relay { control, pairs } => {
                let mut parsed = Vec::new();
                for p in pairs {
                    let (l, t) = p.split_once('=').ok_or_else(|| anyhow::anyhow!("{p}: expected listen=target"))?;
                    parsed.push((l.parse()?, t.parse()?));
                }
                keyway_e2e::app::relay(parsed, control).await?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Connect { to, authority, headers, tls } => {
                let tls = tls.load()?;
                let how = tls.as_ref().map_or(Speak::Plain, Speak::As);
                println!("{}", keyway_e2e::app::connect(to, how, &authority, &headers).await?);
                Ok(ExitCode::SUCCESS)
            }
            Command::Keys { to, ip, tls } => {
                let tls = tls.load()?;
                let how = tls.as_ref().map_or(Speak::Plain, Speak::As);
                let (status, body) = keyway_e2e::loopback::keys_speaking(to, None, how, ip).await?;
                println!("{status}\n{body}");
                Ok(ExitCode::SUCCESS)
            }
            Command::Udp { timeout_ms, targets } => {
                let t = Duration::from_millis(timeout_ms);
                let all: Vec<_> =
                    targets.into_iter().map(|target| tokio::spawn(keyway_e2e::datagram::udp(target, t))).collect();
                for one in all {
                    println!("{}", serde_json::to_string(&one.await?)?);
                }
                Ok(ExitCode::SUCCESS)
            }
            Command::Raw { timeout_ms, sctp_port, targets } => {
                let t = Duration::from_millis(timeout_ms);
                for target in targets {
                    println!("{}", serde_json::to_string(&keyway_e2e::datagram::icmp(target, t))?);
                    println!("{}", serde_json::to_string(&keyway_e2e::datagram::sctp(target, sctp_port))?);
                }
                Ok(ExitCode::SUCCESS)
            }
            Command::Sniff { out, stop_port, max_seconds } => {
                let n = keyway_e2e::sniff::capture(&out, stop_port, Duration::from_secs(max_seconds))?;
                eprintln!("captured {n} segments");
                Ok(ExitCode::SUCCESS)
            }
            Command::Get { url } => {
                let (status, body) = get(&url).await?;
                println!("{status}\n{body}");
                Ok(ExitCode::SUCCESS)
            }
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("keyway-e2e: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn get(url: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let url = url.trim_start_matches("http://");
    let (hostport, path) = url.split_once('/').map(|(h, p)| (h, format!("/{p}"))).unwrap_or((url, "/".into()));
    let mut s = tokio::time::timeout(Duration::from_secs(3), tokio::net::TcpStream::connect(hostport)).await??;
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: {hostport}\r\nconnection: close\r\n\r\n").as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let body =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(body) } else { body.to_owned() };
    Ok((status, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(rest.get(..n).unwrap_or_default());
        s = rest.get(n + 2..).unwrap_or_default();
    }
    out
}
