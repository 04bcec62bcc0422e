//! `keyway ca …`: the overlay certificate authority and gateway certificates.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::ca::{self, CA_VALIDITY_DAYS, DEFAULT_TRUST_DOMAIN, DEVICE_VALIDITY_DAYS, GATEWAY_VALIDITY_DAYS};
use crate::tls::server_name;

/// Exit code for bad input or a failed operation.
const EXIT_FAILURE: u8 = 2;

/// `keyway ca` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum CaCommand {
    /// Create the overlay CA in a directory (ca.pem, ca-key.pem).
    ///
    /// DIR/ca.pem is the CA certificate, which every gateway trusts; DIR/ca-key.pem (mode 0600) is
    /// its key, needed only to issue gateway certificates. The CA is ECDSA P-256, valid 10 years,
    /// and records its trust domain (as its URI SAN spiffe://<trust-domain>), so `keyway ca issue`
    /// needs no --trust-domain. An existing CA is never replaced unless --force is given: replacing
    /// it makes every certificate it issued untrusted.
    ///
    /// Example: keyway ca init --out ./ca --trust-domain cluster.local
    Init {
        /// The directory to create the CA in (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// The SPIFFE trust domain of the overlay.
        #[arg(long, value_name = "DOMAIN", default_value = DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// Replace an existing CA in DIR.
        #[arg(long)]
        force: bool,
        /// Validity in days.
        #[arg(long, default_value_t = CA_VALIDITY_DAYS)]
        days: u32,
    },
    /// Issue the certificate and key of one gateway.
    ///
    /// Writes OUT/<zone>-<name>.pem and OUT/<zone>-<name>-key.pem (mode 0600). The certificate
    /// (ECDSA P-256) names the gateway spiffe://<trust-domain>/zone/<zone>/gateway/<name> (URI SAN)
    /// and <name>.<zone>.gateway.keyway (DNS SAN, the server name peers connect with), and serves
    /// as both server and client certificate on the QUIC overlay. Issuing again replaces the files
    /// (renewal). Zone and name are DNS labels: lower-case letters, digits and '-'.
    ///
    /// Example: keyway ca issue --ca ./ca --zone zone-a --name gw-1 --out ./certs
    Issue {
        /// The CA directory (ca.pem and ca-key.pem, from `keyway ca init`).
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// The gateway's zone.
        #[arg(long, value_name = "ZONE")]
        zone: String,
        /// The gateway's name within its zone.
        #[arg(long, value_name = "NAME")]
        name: String,
        /// The directory to write the certificate and key to (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Validity in days (at most the CA's remaining validity).
        #[arg(long, default_value_t = GATEWAY_VALIDITY_DAYS)]
        days: u32,
    },
    /// Issue a mesh workload certificate, where no istiod issues them (the demo, a mesh without
    /// Istio, a gateway's own mesh certificate outside Istio).
    ///
    /// Writes OUT/<namespace>-<service-account>.pem and OUT/<namespace>-<service-account>-key.pem
    /// (mode 0600): one URI SAN spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>, as
    /// istiod issues to a sidecar, server and client use. CA is the mesh CA's directory (create one
    /// with `keyway ca init --out ./mesh-ca`, separate from the overlay CA). The gateway's `mesh`
    /// section names such a certificate, its key and the mesh CA's ca.pem; sidecars present theirs
    /// to the gateway's tunnel and key service. In Istio, use istiod's certificates instead
    /// (docs/install-istio.md).
    ///
    /// Example: keyway ca issue-workload --ca ./mesh-ca --namespace keyway-system --service-account keyway-gateway --out ./mesh
    IssueWorkload {
        /// The mesh CA directory (ca.pem and ca-key.pem).
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// The workload's namespace.
        #[arg(long, value_name = "NAMESPACE")]
        namespace: String,
        /// The workload's service account.
        #[arg(long, value_name = "NAME")]
        service_account: String,
        /// The directory to write the certificate and key to (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Validity in days (at most the CA's remaining validity).
        #[arg(long, default_value_t = GATEWAY_VALIDITY_DAYS)]
        days: u32,
    },
    /// Issue the identity certificate of a device outside the clusters (`keyway agent`).
    ///
    /// Writes OUT/<namespace>-<service-account>.pem and OUT/<namespace>-<service-account>-key.pem
    /// (mode 0600), from the overlay CA (the directory of `keyway ca issue`): one URI SAN
    /// spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>, client use only, ECDSA P-256,
    /// 90 days by default. NAMESPACE and SERVICE-ACCOUNT are those of the device's WorkloadEntry
    /// in the inventory (its metadata.namespace and spec.serviceAccount, `default` when unset),
    /// which the NetworkPolicies select. Issuing again replaces the files (renewal); revoke a lost
    /// device's certificate with `keyway ca revoke`.
    ///
    /// Example: keyway ca issue-device --ca ./ca --namespace field --service-account laptop-7 --out ./device
    IssueDevice {
        /// The overlay CA directory (ca.pem and ca-key.pem, from `keyway ca init`).
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// The namespace of the device's WorkloadEntry.
        #[arg(long, value_name = "NAMESPACE")]
        namespace: String,
        /// The service account of the device's WorkloadEntry (spec.serviceAccount).
        #[arg(long, value_name = "NAME", default_value = "default")]
        service_account: String,
        /// The directory to write the certificate and key to (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Validity in days (at most the CA's remaining validity).
        #[arg(long, default_value_t = DEVICE_VALIDITY_DAYS)]
        days: u32,
    },
    /// Revoke a certificate the CA issued (a lost device, a retired gateway, a pod's mesh
    /// certificate), or re-sign the revocation list.
    ///
    /// Adds the certificate's serial number to DIR/revoked.pem, an X.509 CRL signed by the CA
    /// listing every certificate it revoked (created on first use), and signs it again: CRL
    /// number one more, thisUpdate now, nextUpdate in 7 days. A certificate the CA did not issue
    /// is refused. Works for the overlay CA and for a mesh CA of `keyway ca init`. Gateways read
    /// the list at start and on reload and use it whatever its nextUpdate (nextUpdate is a reminder:
    /// run `keyway ca revoke --refresh` weekly for tools that check it); copy the new file to
    /// every gateway.
    ///
    /// Example: keyway ca revoke --ca ./ca --cert ./device/field-laptop-7.pem
    Revoke {
        /// The CA directory (ca.pem, ca-key.pem; revoked.pem is written there).
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// The certificate to revoke (PEM; the first certificate of a chain).
        #[arg(long, value_name = "FILE", required_unless_present = "refresh", conflicts_with = "refresh")]
        cert: Option<PathBuf>,
        /// Re-sign the list with new dates and no new entry (writes an empty list where none exists).
        #[arg(long)]
        refresh: bool,
    },
}

/// Runs the command: what was written on stdout; an error as one line on stderr and exit code 2.
pub fn run(cmd: CaCommand) -> ExitCode {
    match execute(cmd) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("keyway: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn execute(cmd: CaCommand) -> Result<String, ca::CaError> {
    match cmd {
        CaCommand::Init { out, trust_domain, force, days } => {
            let files = ca::init_ca_with(&out, &trust_domain, days, force)?;
            let loaded = ca::Ca::load(&out)?;
            Ok(format!(
                "created the overlay CA of trust domain {trust_domain}, valid until {}\n\
                 {}\tthe CA certificate: give it to every gateway\n\
                 {}\tthe CA key (mode 0600): keep it off the gateways; only `keyway ca issue` needs it\n",
                ca::utc_date(loaded.not_after_unix()),
                files.cert.display(),
                files.key.display(),
            ))
        }
        CaCommand::Issue { ca: ca_dir, zone, name, out, days } => {
            let loaded = ca::Ca::load(&ca_dir)?;
            let (paths, issued) = ca::issue_gateway_with(&loaded, &zone, &name, days, &out)?;
            Ok(format!(
                "issued {} ({}), valid until {}\n\
                 {}\tthe gateway certificate\n\
                 {}\tthe gateway key (mode 0600)\n",
                issued.identity.spiffe_id(),
                server_name(&issued.identity),
                ca::utc_date(issued.not_after_unix),
                paths.cert.display(),
                paths.key.display(),
            ))
        }
        CaCommand::IssueWorkload { ca: ca_dir, namespace, service_account, out, days } => {
            let loaded = ca::Ca::load(&ca_dir)?;
            let paths = ca::issue_workload_with(&loaded, &namespace, &service_account, days, &out)?;
            Ok(format!(
                "issued spiffe://{}/ns/{namespace}/sa/{service_account}\n\
                 {}\tthe workload certificate\n\
                 {}\tthe workload key (mode 0600)\n",
                loaded.trust_domain(),
                paths.cert.display(),
                paths.key.display(),
            ))
        }
        CaCommand::IssueDevice { ca: ca_dir, namespace, service_account, out, days } => {
            let loaded = ca::Ca::load(&ca_dir)?;
            let paths =
                ca::issue_identity_with(&loaded, &namespace, &service_account, ca::WorkloadUse::Device, days, &out)?;
            Ok(format!(
                "issued device spiffe://{}/ns/{namespace}/sa/{service_account}, valid {days} days\n\
                 {}\tthe device certificate: give it to `keyway agent` with the overlay CA's ca.pem\n\
                 {}\tthe device key (mode 0600): keep it on the device only\n\
                 declare the device in the inventory as a WorkloadEntry {namespace}/<name> with \
                 spec.serviceAccount {service_account}, keyway.io/zone and keyway.io/overlay-ips (docs/policy.md)\n",
                loaded.trust_domain(),
                paths.cert.display(),
                paths.key.display(),
            ))
        }
        CaCommand::Revoke { ca: ca_dir, cert, refresh: _ } => {
            let now = std::time::SystemTime::now();
            let r = match &cert {
                Some(cert) => ca::revoke(&ca_dir, cert, now)?,
                None => ca::refresh_crl(&ca_dir, now)?,
            };
            let what = match (&r.serial, r.already_revoked) {
                (Some(serial), false) => format!("revoked serial {serial}"),
                (Some(serial), true) => format!("serial {serial} was already revoked; list signed again"),
                (None, _) => "revocation list signed again".to_owned(),
            };
            Ok(format!(
                "{what}: {} certificate(s) revoked, CRL number {}, next update {}\n\
                 {}\tthe revocation list: copy it to every gateway (gateways refuse the certificates it names)\n",
                r.revoked,
                r.crl_number,
                ca::utc_date(i64::try_from(r.next_update_unix).unwrap_or(i64::MAX)),
                r.path.display(),
            ))
        }
    }
}
