//! The full connectivity of a manifest set, in the reference analyzer's format and others.

use std::fmt::Write as _;

use crate::engine::{Engine, Peer};
use crate::ip::{Range, v4_partition};
use crate::policy::Direction;
use crate::ports::ConnSet;

/// One line of the connectivity list: a pair of peers with a non-empty connection set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connection {
    /// Source: `ns/name[Kind]` or `a.b.c.d-e.f.g.h[External]`.
    pub src: String,
    /// Destination, as `src`.
    pub dst: String,
    /// What is allowed.
    pub conn: ConnSet,
}

/// Output formats of the connectivity list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// The reference analyzer's text format, byte for byte.
    Txt,
    /// A JSON array of `{src, dst, conn}`.
    Json,
    /// A Markdown table.
    Md,
    /// CSV with a header.
    Csv,
    /// Graphviz.
    Dot,
}

impl Format {
    /// Parses `txt`, `json`, `md`, `csv` or `dot`.
    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "txt" => Some(Format::Txt),
            "json" => Some(Format::Json),
            "md" => Some(Format::Md),
            "csv" => Some(Format::Csv),
            "dot" => Some(Format::Dot),
            _ => None,
        }
    }
}

fn range_name(r: &Range) -> String {
    format!("{r}[External]")
}

/// Every allowed connection between workloads and between workloads and the IPv4 ranges that the
/// policies' address blocks cut the address space into, sorted by source then destination.
pub fn connections(engine: &Engine) -> Vec<Connection> {
    let policies = engine.policies();
    let src_ranges = v4_partition(policies.ip_peers(Direction::Ingress).iter().flat_map(|p| p.set.ranges()));
    let dst_ranges = v4_partition(policies.ip_peers(Direction::Egress).iter().flat_map(|p| p.set.ranges()));
    let workloads = &engine.inventory().workloads;
    let names: Vec<String> = workloads.iter().map(|w| w.display_name()).collect();
    let mut out = Vec::new();
    let mut push = |src: &str, dst: &str, conn: ConnSet| {
        if !conn.is_empty() {
            out.push(Connection { src: src.to_owned(), dst: dst.to_owned(), conn });
        }
    };
    for (i, src) in names.iter().enumerate() {
        for (j, dst) in names.iter().enumerate() {
            if i != j {
                push(src, dst, engine.allowed(Peer::Workload(i), Peer::Workload(j)));
            }
        }
        for r in &dst_ranges {
            let ip = Peer::Ip(crate::ip::ip(r.first));
            push(src, &range_name(r), engine.allowed(Peer::Workload(i), ip));
        }
    }
    for r in &src_ranges {
        let ip = Peer::Ip(crate::ip::ip(r.first));
        let name = range_name(r);
        for (j, dst) in names.iter().enumerate() {
            push(&name, dst, engine.allowed(ip, Peer::Workload(j)));
        }
    }
    out.sort_by(|a, b| (a.src.as_bytes(), a.dst.as_bytes()).cmp(&(b.src.as_bytes(), b.dst.as_bytes())));
    out
}

/// Renders connections in `format`.
pub fn render(conns: &[Connection], format: Format) -> String {
    let mut s = String::new();
    match format {
        Format::Txt => {
            for c in conns {
                let _ = writeln!(s, "{} => {} : {}", c.src, c.dst, c.conn);
            }
        }
        Format::Json => {
            let v: Vec<serde_json::Value> = conns
                .iter()
                .map(|c| serde_json::json!({"src": c.src, "dst": c.dst, "conn": c.conn.to_string()}))
                .collect();
            s = serde_json::to_string_pretty(&v).unwrap_or_default();
            s.push('\n');
        }
        Format::Md => {
            s.push_str("| src | dst | conn |\n|-----|-----|------|\n");
            for c in conns {
                let _ = writeln!(s, "| {} | {} | {} |", c.src, c.dst, c.conn);
            }
        }
        Format::Csv => {
            s.push_str("src,dst,conn\n");
            for c in conns {
                let _ = writeln!(s, "{},{},\"{}\"", c.src, c.dst, c.conn);
            }
        }
        Format::Dot => {
            s.push_str("digraph {\n");
            let mut nodes: Vec<&str> = conns.iter().flat_map(|c| [c.src.as_str(), c.dst.as_str()]).collect();
            nodes.sort_unstable();
            nodes.dedup();
            for n in nodes {
                let shape = if n.ends_with("[External]") { "box" } else { "ellipse" };
                let _ = writeln!(s, "\t\"{n}\" [label=\"{n}\" shape={shape}]");
            }
            for c in conns {
                let _ = writeln!(s, "\t\"{}\" -> \"{}\" [label=\"{}\"]", c.src, c.dst, c.conn);
            }
            s.push_str("}\n");
        }
    }
    s
}
