//! `keyway policy …`: the connectivity list and explanations of single flows.

use std::io::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Subcommand, ValueEnum};
use keyway_policy::connlist::{self, Format};
use keyway_policy::engine::Peer;
use keyway_policy::{Engine, Protocol};

/// Exit code for bad input (a missing directory, an invalid manifest, an unknown workload).
const EXIT_BAD_INPUT: u8 = 2;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Output {
    /// `src => dst : conn` lines, byte for byte the format of np-guard's netpol-analyzer.
    Txt,
    /// A JSON array of {src, dst, conn}.
    Json,
    /// A Markdown table.
    Md,
    /// CSV with a header line.
    Csv,
    /// A Graphviz digraph.
    Dot,
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Print every allowed connection between the workloads of a manifest directory and the
    /// address ranges its policies name.
    ///
    /// Reads every *.yaml, *.yml and *.json file under DIR (Namespaces, Pods, Deployments and
    /// the other workload kinds, NetworkPolicies, AdminNetworkPolicies and the
    /// BaselineAdminNetworkPolicy; other kinds are ignored). Warnings go to stderr; an invalid
    /// input stops with one line naming the file, the object and the field, and exit code 2.
    ///
    /// Example: keyway policy connlist --dir samples/shop
    Connlist {
        /// The directory of manifests.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = Output::Txt)]
        output: Output,
    },
    /// Decide one flow and explain the decision: for the source's egress and the destination's
    /// ingress, which admin rule, NetworkPolicy rule or default decided, in order.
    ///
    /// Example: keyway policy explain --dir samples/shop --src shop/frontend --dst shop/cart --port 7070/TCP
    Explain {
        /// The directory of manifests.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The source: a workload as NAMESPACE/NAME (or NAMESPACE/NAME[Kind]), or an IP address.
        #[arg(long, value_name = "NS/NAME|IP")]
        src: String,
        /// The destination, as --src.
        #[arg(long, value_name = "NS/NAME|IP")]
        dst: String,
        /// The destination port and protocol (TCP when omitted): 8080, 53/UDP, 9000/SCTP.
        #[arg(long, value_name = "PORT[/PROTO]")]
        port: String,
    },
}

pub fn run(cmd: PolicyCommand) -> ExitCode {
    match execute(cmd) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("keyway: {message}");
            ExitCode::from(EXIT_BAD_INPUT)
        }
    }
}

fn load(dir: &std::path::Path) -> Result<Engine, String> {
    let (engine, warnings) = keyway_policy::fs::load_dir(dir).map_err(|e| e.to_string())?;
    for w in warnings {
        eprintln!("{w}");
    }
    Ok(engine)
}

fn execute(cmd: PolicyCommand) -> Result<(), String> {
    let out = match cmd {
        PolicyCommand::Connlist { dir, output } => {
            let engine = load(&dir)?;
            let format = match output {
                Output::Txt => Format::Txt,
                Output::Json => Format::Json,
                Output::Md => Format::Md,
                Output::Csv => Format::Csv,
                Output::Dot => Format::Dot,
            };
            connlist::render(&connlist::connections(&engine), format)
        }
        PolicyCommand::Explain { dir, src, dst, port } => {
            let (port, protocol) = parse_port(&port)?;
            let engine = load(&dir)?;
            let src = peer(&engine, &src, "--src")?;
            let dst = peer(&engine, &dst, "--dst")?;
            engine.explain(src, dst, protocol, port).text
        }
    };
    let mut stdout = std::io::stdout().lock();
    // A closed pipe (`| head`) is not an error worth reporting.
    let _ = stdout.write_all(out.as_bytes());
    Ok(())
}

fn parse_port(s: &str) -> Result<(u16, Protocol), String> {
    let (num, proto) = match s.split_once('/') {
        Some((n, p)) => (n, p),
        None => (s, "TCP"),
    };
    let protocol = Protocol::parse(&proto.to_ascii_uppercase())
        .ok_or_else(|| format!("--port {s}: unknown protocol {proto:?}; expected TCP, UDP or SCTP"))?;
    let port = num
        .parse::<u16>()
        .ok()
        .filter(|p| *p >= 1)
        .ok_or_else(|| format!("--port {s}: {num:?} is not a port number (1-65535)"))?;
    Ok((port, protocol))
}

fn peer(engine: &Engine, s: &str, flag: &str) -> Result<Peer, String> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(engine.peer_for(ip));
    }
    let (name, kind) = match s.strip_suffix(']').and_then(|x| x.split_once('[')) {
        Some((n, k)) => (n, Some(k)),
        None => (s, None),
    };
    let Some((ns, name)) = name.split_once('/') else {
        return Err(format!("{flag} {s}: expected NAMESPACE/NAME, NAMESPACE/NAME[Kind] or an IP address"));
    };
    let workloads = &engine.inventory().workloads;
    let found: Vec<usize> = workloads
        .iter()
        .enumerate()
        .filter(|(_, w)| w.namespace == ns && w.name == name && kind.is_none_or(|k| w.kind == k))
        .map(|(i, _)| i)
        .collect();
    match found.as_slice() {
        [i] => Ok(Peer::Workload(*i)),
        [] => {
            let known: Vec<String> =
                workloads.iter().filter(|w| w.namespace == ns).map(|w| w.display_name()).take(10).collect();
            let hint = if known.is_empty() {
                format!("namespace {ns:?} has no workloads")
            } else {
                format!("workloads in {ns}: {}", known.join(", "))
            };
            Err(format!("{flag} {s}: no such workload ({hint})"))
        }
        many => {
            let names: Vec<String> = many.iter().filter_map(|i| workloads.get(*i)).map(|w| w.display_name()).collect();
            Err(format!("{flag} {s}: ambiguous, name the kind: {}", names.join(" or ")))
        }
    }
}
