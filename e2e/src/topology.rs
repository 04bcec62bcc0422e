//! Zones as network namespaces: a router namespace, one namespace per zone (a bridge for its
//! pods), one namespace per pod (gateway or workload), veth links between them. Links can be cut
//! and made lossy; everything is removed on drop.

use std::process::Command;

use anyhow::{Context, bail};

/// Runs a command, failing loudly with its output.
pub fn sh(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(args.first().copied().unwrap_or_default())
        .args(args.get(1..).unwrap_or_default())
        .output()
        .with_context(|| format!("cannot run {}", args.join(" ")))?;
    if !out.status.success() {
        bail!("`{}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command inside a namespace.
pub fn ns_sh(ns: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut all = vec!["ip", "netns", "exec", ns];
    all.extend_from_slice(args);
    sh(&all)
}

/// An HTTP GET from inside a namespace with `keyway-e2e get` (`e2e`): (status, body).
pub fn ns_get(ns: &str, e2e: &std::path::Path, url: &str) -> anyhow::Result<(u16, String)> {
    let out = ns_sh(ns, &[e2e.to_str().unwrap_or_default(), "get", url])?;
    let (status, body) = out.split_once('\n').unwrap_or((out.as_str(), ""));
    Ok((status.trim().parse().unwrap_or(0), body.to_owned()))
}

/// Fails with one clear line when this process cannot create network namespaces.
pub fn require_root() -> anyhow::Result<()> {
    let uid = sh(&["id", "-u"])?;
    if uid.trim() != "0" {
        bail!(
            "the end-to-end harness builds network namespaces and must run as root (uid is {}); run it with sudo or as root",
            uid.trim()
        );
    }
    for tool in ["ip", "iptables", "setpriv"] {
        if sh(&["sh", "-c", &format!("command -v {tool}")]).is_err() {
            bail!("the end-to-end harness needs `{tool}` (Debian packages iproute2, iptables, util-linux)");
        }
    }
    Ok(())
}

/// A pod: a namespace with one interface on its zone's bridge.
#[derive(Debug, Clone)]
pub struct Pod {
    /// Namespace name.
    pub ns: String,
    /// Zone index (1-based).
    pub zone: u8,
    /// Underlay address.
    pub ip: String,
}

/// The namespaces of one run.
#[derive(Debug)]
pub struct Topology {
    /// Name prefix of every namespace of this run.
    pub prefix: String,
    /// The router namespace.
    pub router: String,
    /// Zone namespaces, by zone index - 1.
    pub zones: Vec<String>,
    namespaces: Vec<String>,
    links: u32,
    mtu: u16,
}

impl Topology {
    /// Creates the router and `zones` zone namespaces: zone `z` has the pod subnet 10.61.z.0/24
    /// (its bridge is 10.61.z.1) and reaches the router over 10.60.z.0/24 (router .1, zone .2).
    pub fn new(prefix: &str, zones: u8) -> anyhow::Result<Topology> {
        Topology::with_mtu(prefix, zones, 1500)
    }

    /// [`Topology::new`] with every link's MTU `mtu` (9000: the jumbo frames of many clusters).
    pub fn with_mtu(prefix: &str, zones: u8, mtu: u16) -> anyhow::Result<Topology> {
        // Remove what a crashed earlier run of the same prefix left behind.
        if let Ok(list) = sh(&["ip", "netns", "list"]) {
            for line in list.lines() {
                let name = line.split_whitespace().next().unwrap_or_default();
                if name.starts_with(&format!("{prefix}-")) {
                    let _ = sh(&["ip", "netns", "del", name]);
                }
            }
        }
        let router = format!("{prefix}-r");
        let mut t = Topology {
            prefix: prefix.to_owned(),
            router: router.clone(),
            zones: Vec::new(),
            namespaces: Vec::new(),
            links: 0,
            mtu,
        };
        t.add_ns(&router)?;
        ns_sh(&router, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        for z in 1..=zones {
            let zns = format!("{prefix}-z{z}");
            t.add_ns(&zns)?;
            ns_sh(&zns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
            ns_sh(&zns, &["ip", "link", "add", "br0", "type", "bridge"])?;
            ns_sh(&zns, &["ip", "addr", "add", &format!("10.61.{z}.1/24"), "dev", "br0"])?;
            ns_sh(&zns, &["ip", "link", "set", "br0", "up"])?;
            let (a, b) = t.veth(&zns, "uplink", &router, &format!("z{z}"))?;
            let _ = (a, b);
            ns_sh(&zns, &["ip", "addr", "add", &format!("10.60.{z}.2/24"), "dev", "uplink"])?;
            ns_sh(&router, &["ip", "addr", "add", &format!("10.60.{z}.1/24"), "dev", &format!("z{z}")])?;
            ns_sh(&zns, &["ip", "route", "add", "default", "via", &format!("10.60.{z}.1")])?;
            ns_sh(&router, &["ip", "route", "add", &format!("10.61.{z}.0/24"), "via", &format!("10.60.{z}.2")])?;
            t.zones.push(zns);
        }
        Ok(t)
    }

    fn add_ns(&mut self, ns: &str) -> anyhow::Result<()> {
        sh(&["ip", "netns", "add", ns])?;
        self.namespaces.push(ns.to_owned());
        ns_sh(ns, &["ip", "link", "set", "lo", "up"])?;
        Ok(())
    }

    /// A veth pair between two namespaces, named `a_name` and `b_name` inside them.
    fn veth(&mut self, a_ns: &str, a_name: &str, b_ns: &str, b_name: &str) -> anyhow::Result<(String, String)> {
        self.links += 1;
        let tag = self.prefix.trim_start_matches("kw");
        let (ta, tb) = (format!("kv{tag}a{}", self.links), format!("kv{tag}b{}", self.links));
        sh(&["ip", "link", "add", &ta, "type", "veth", "peer", "name", &tb])?;
        sh(&["ip", "link", "set", &ta, "netns", a_ns])?;
        sh(&["ip", "link", "set", &tb, "netns", b_ns])?;
        ns_sh(a_ns, &["ip", "link", "set", &ta, "name", a_name])?;
        ns_sh(b_ns, &["ip", "link", "set", &tb, "name", b_name])?;
        let mtu = self.mtu.to_string();
        ns_sh(a_ns, &["ip", "link", "set", a_name, "mtu", &mtu, "up"])?;
        ns_sh(b_ns, &["ip", "link", "set", b_name, "mtu", &mtu, "up"])?;
        Ok((a_name.to_owned(), b_name.to_owned()))
    }

    /// Adds a pod namespace on zone `zone` (1-based) with address 10.61.zone.host.
    pub fn pod(&mut self, name: &str, zone: u8, host: u8) -> anyhow::Result<Pod> {
        let ns = format!("{}-z{zone}-{name}", self.prefix);
        self.add_ns(&ns)?;
        let zns = self.zones.get(usize::from(zone) - 1).cloned().context("no such zone")?;
        let port = format!("p{host}");
        self.veth(&ns, "eth0", &zns, &port)?;
        ns_sh(&zns, &["ip", "link", "set", &port, "master", "br0"])?;
        let ip = format!("10.61.{zone}.{host}");
        ns_sh(&ns, &["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        ns_sh(&ns, &["ip", "route", "add", "default", "via", &format!("10.61.{zone}.1")])?;
        Ok(Pod { ns, zone, ip })
    }

    /// Adds a device namespace outside every zone: linked to the router over 10.63.`n`.0/24
    /// (router .1, device .2), as a laptop on the internet reaches a cluster's edge.
    pub fn device(&mut self, name: &str, n: u8) -> anyhow::Result<Pod> {
        let ns = format!("{}-{name}", self.prefix);
        self.add_ns(&ns)?;
        let router = self.router.clone();
        self.veth(&ns, "eth0", &router, &format!("d{n}"))?;
        let ip = format!("10.63.{n}.2");
        ns_sh(&ns, &["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        ns_sh(&router, &["ip", "addr", "add", &format!("10.63.{n}.1/24"), "dev", &format!("d{n}")])?;
        ns_sh(&ns, &["ip", "route", "add", "default", "via", &format!("10.63.{n}.1")])?;
        Ok(Pod { ns, zone: 0, ip })
    }

    /// Moves device `n` (see [`Topology::device`]) to another address of its link, as a laptop
    /// that roams to another network: the old address is gone, `host` is the new one.
    pub fn move_device(&self, pod: &mut Pod, n: u8, host: u8) -> anyhow::Result<()> {
        let ip = format!("10.63.{n}.{host}");
        // The new address stays when the old (primary) one goes.
        ns_sh(&pod.ns, &["sysctl", "-qw", "net.ipv4.conf.eth0.promote_secondaries=1"])?;
        ns_sh(&pod.ns, &["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        ns_sh(&pod.ns, &["ip", "addr", "del", &format!("{}/24", pod.ip), "dev", "eth0"])?;
        ns_sh(&pod.ns, &["ip", "route", "replace", "default", "via", &format!("10.63.{n}.1")])?;
        pod.ip = ip;
        Ok(())
    }

    /// Adds an address to the router's loopback (relay endpoints, the "internet" host).
    pub fn router_address(&self, ip: &str) -> anyhow::Result<()> {
        // Zones reach it by their default route (the router).
        ns_sh(&self.router, &["ip", "addr", "add", &format!("{ip}/32"), "dev", "lo"])?;
        Ok(())
    }

    /// Cuts (`up = false`) or restores the link between a zone and the router.
    pub fn set_zone_link(&self, zone: u8, up: bool) -> anyhow::Result<()> {
        let state = if up { "up" } else { "down" };
        ns_sh(&self.router, &["ip", "link", "set", &format!("z{zone}"), state])?;
        if up {
            // Setting a link down removes its routes; put them back.
            ns_sh(
                &self.router,
                &["ip", "route", "replace", &format!("10.61.{zone}.0/24"), "via", &format!("10.60.{zone}.2")],
            )?;
        }
        Ok(())
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            let _ = sh(&["ip", "netns", "del", ns]);
        }
    }
}
