//! Gateway configurations of the beds, built as [`Config`] values and written with serde: the
//! file a user would write, every setting a bed does not choose left at the default a file that
//! omits it gets. The in-process bed (`loopback`), the namespace bed (`cluster`) and the
//! benchmark bed all build theirs here.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use keyway_gateway::ca::{CaFiles, IssuedPaths};
use keyway_gateway::config::{GatewayPeer, MeshFiles, TlsFiles};
use serde::Serialize;

/// What a bed sets of a configuration (for beds that do not link the gateway themselves).
pub use keyway_gateway::config::{Config, DEFAULT_ADMIN_PORT, DEFAULT_OVERLAY_PORT, DEFAULT_TUNNEL_PORT, Listen, Zone};

/// One zone of a bed's overlay.
#[derive(Debug, Clone, Copy)]
pub struct ZoneLayout<'a> {
    /// Its name.
    pub name: &'a str,
    /// Its gateways' names.
    pub gateways: &'a [&'a str],
    /// Where its services fail over to, in order.
    pub failover: &'a [&'a str],
}

/// The `zones` of a configuration: every zone of `layout`, gateway `name` of zone `zone` at
/// `address(zone, name)`.
pub fn zones(layout: &[ZoneLayout<'_>], address: impl Fn(&str, &str) -> SocketAddr) -> Vec<Zone> {
    layout
        .iter()
        .map(|z| Zone {
            name: z.name.to_owned(),
            gateways: z
                .gateways
                .iter()
                .map(|n| GatewayPeer { name: (*n).to_owned(), address: address(z.name, n) })
                .collect(),
            entry: None,
            ca: None,
            failover: z.failover.iter().map(|f| (*f).to_owned()).collect(),
        })
        .collect()
}

/// The files of a bed's gateways: shared (CAs, inventory), per zone (epoch secrets) and per
/// replica (certificates).
#[derive(Debug, Clone)]
pub struct Files {
    /// The overlay CA directory (`keyway ca init --out`).
    pub ca: PathBuf,
    /// Where gateway certificates are issued (`keyway ca issue --out`).
    pub certs: PathBuf,
    /// The mesh CA directory: the beds' istiod, issuing workload certificates.
    pub mesh_ca: PathBuf,
    /// Where mesh certificates are issued (`keyway ca issue-workload --out`): sidecars' in it,
    /// each gateway replica's in a directory of its own ([`Files::mesh`]).
    pub mesh_certs: PathBuf,
    /// Where each zone's epoch secrets file is (see [`Files::secrets`]).
    pub secrets_dir: PathBuf,
    /// The manifest directory.
    pub inventory: PathBuf,
}

impl Files {
    /// The files of a bed rooted at `dir`: `ca/`, `certs/`, `mesh-ca/`, `mesh/`,
    /// `secrets/<zone>.json`, `manifests/`.
    pub fn in_dir(dir: &Path) -> Files {
        Files {
            ca: dir.join("ca"),
            certs: dir.join("certs"),
            mesh_ca: dir.join("mesh-ca"),
            mesh_certs: dir.join("mesh"),
            secrets_dir: dir.join("secrets"),
            inventory: dir.join("manifests"),
        }
    }

    /// The epoch secrets of `zone` (`keyway keys init --out`), held by that zone's gateways only:
    /// one file per zone, so a leaked zone impersonates none of another zone's workloads.
    pub fn secrets(&self, zone: &str) -> PathBuf {
        self.secrets_dir.join(format!("{zone}.json"))
    }

    /// The TLS files of gateway `zone`/`name`.
    pub fn tls(&self, zone: &str, name: &str) -> TlsFiles {
        let issued = IssuedPaths::in_dir(&self.certs, zone, name);
        TlsFiles { ca: CaFiles::in_dir(&self.ca).cert, cert: issued.cert, key: issued.key }
    }
}

impl Files {
    /// Where the mesh certificate of gateway replica `zone`/`name` is issued (its own key).
    pub fn mesh_dir(&self, zone: &str, name: &str) -> PathBuf {
        self.mesh_certs.join(format!("gateway-{zone}-{name}"))
    }

    /// The mesh files of gateway replica `zone`/`name` (the certificate of the gateways' service
    /// account, [`crate::mesh::GATEWAY_SERVICE_ACCOUNT`]).
    pub fn mesh(&self, zone: &str, name: &str) -> MeshFiles {
        let issued = IssuedPaths::in_dir(
            &self.mesh_dir(zone, name),
            crate::mesh::GATEWAY_NAMESPACE,
            crate::mesh::GATEWAY_SERVICE_ACCOUNT,
        );
        MeshFiles { ca: CaFiles::in_dir(&self.mesh_ca).cert, cert: issued.cert, key: issued.key }
    }

    /// The mesh files of the workload `namespace`/`service_account` (its sidecar's).
    pub fn workload_mesh(&self, namespace: &str, service_account: &str) -> MeshFiles {
        let issued = IssuedPaths::in_dir(&self.mesh_certs, namespace, service_account);
        MeshFiles { ca: CaFiles::in_dir(&self.mesh_ca).cert, cert: issued.cert, key: issued.key }
    }
}

/// What a configuration file must say; everything else takes the gateway's defaults.
#[derive(Serialize)]
struct Required<'a> {
    zone: &'a str,
    name: &'a str,
    listen: &'a Listen,
    tls: TlsFiles,
    mesh: MeshFiles,
    secrets: PathBuf,
    inventory: &'a Path,
    zones: &'a [Zone],
}

/// The configuration of gateway `zone`/`name` listening on `listen`, with every optional setting
/// at its default; set fields on the result for the rest.
pub fn config(zone: &str, name: &str, listen: Listen, files: &Files, zones: &[Zone]) -> anyhow::Result<Config> {
    let required = Required {
        zone,
        name,
        listen: &listen,
        tls: files.tls(zone, name),
        mesh: files.mesh(zone, name),
        secrets: files.secrets(zone),
        inventory: &files.inventory,
        zones,
    };
    Ok(serde_yaml_ng::from_value(serde_yaml_ng::to_value(required)?)?)
}

/// The configuration as the gateway reads it: YAML, checked by the gateway's own parser.
pub fn to_yaml(config: &Config) -> anyhow::Result<String> {
    let text = serde_yaml_ng::to_string(config)?;
    let back = Config::parse(&text, "generated")?;
    anyhow::ensure!(&back == config, "the configuration does not survive its own YAML");
    Ok(text)
}

/// Writes the configuration to `path` (see [`to_yaml`]).
pub fn write(config: &Config, path: &Path) -> anyhow::Result<()> {
    std::fs::write(path, to_yaml(config)?)?;
    Ok(())
}

/// The names of the gateways of `zone` that a gateway's `/peers` answer shows up.
pub fn peers_up(peers: &str, zone: &str) -> Vec<String> {
    let peers: serde_json::Value = serde_json::from_str(peers).unwrap_or_default();
    peers
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["zone"] == zone && p["up"] == true)
        .filter_map(|p| p["name"].as_str().map(str::to_owned))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_built_configuration_is_a_valid_file_with_the_defaults() {
        let layout = [
            ZoneLayout { name: "zone-a", gateways: &["gw-1", "gw-2"], failover: &["zone-b"] },
            ZoneLayout { name: "zone-b", gateways: &["gw-1"], failover: &[] },
        ];
        let zs = zones(&layout, |z, n| {
            let host = if z == "zone-a" { 1 } else { 2 };
            let port = if n == "gw-1" { 15443 } else { 15444 };
            SocketAddr::from(([10, 0, 0, host], port))
        });
        let files = Files::in_dir(Path::new("/run/bed"));
        let mut c = config("zone-a", "gw-2", Listen::default(), &files, &zs).unwrap();
        c.keepalive_ms = 200;
        let text = to_yaml(&c).unwrap();
        let back = Config::parse(&text, "t").unwrap();
        assert_eq!(back, c);
        assert_eq!(back.tls.cert, Path::new("/run/bed/certs/zone-a-gw-2.pem"));
        assert_eq!(back.tls.ca, Path::new("/run/bed/ca/ca.pem"));
        assert_eq!(back.secrets, Path::new("/run/bed/secrets/zone-a.json"), "the zone's own secrets");
        assert_eq!(back.zones[0].gateways[1].address, "10.0.0.1:15444".parse().unwrap());
        assert_eq!(back.zones[0].failover, ["zone-b"]);
        // Everything left out has the default of a file that leaves it out.
        let minimal = Config::parse(
            "zone: zone-a\nname: gw-2\ntls: {ca: /run/bed/ca/ca.pem, cert: /run/bed/certs/zone-a-gw-2.pem, key: /run/bed/certs/zone-a-gw-2-key.pem}\nmesh: {ca: /run/bed/mesh-ca/ca.pem, cert: /run/bed/mesh/gateway-zone-a-gw-2/keyway-system-keyway-gateway.pem, key: /run/bed/mesh/gateway-zone-a-gw-2/keyway-system-keyway-gateway-key.pem}\nsecrets: /run/bed/secrets/zone-a.json\ninventory: /run/bed/manifests\nzones: [{name: zone-a, gateways: [{name: gw-1, address: \"10.0.0.1:15443\"}, {name: gw-2, address: \"10.0.0.1:15444\"}], failover: [zone-b]}, {name: zone-b, gateways: [{name: gw-1, address: \"10.0.0.2:15443\"}]}]\n",
            "t",
        )
        .unwrap();
        c.keepalive_ms = minimal.keepalive_ms;
        assert_eq!(c, minimal);
        // An inconsistent one is refused by the gateway's own checks.
        let mut bad = c.clone();
        bad.name = "gw-9".into();
        assert!(to_yaml(&bad).is_err());
    }
}
