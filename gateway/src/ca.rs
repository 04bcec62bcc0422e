//! The overlay certificate authority and gateway certificates (rcgen, ECDSA P-256).
//!
//! A CA directory holds `ca.pem` (the CA certificate, which every gateway trusts) and
//! `ca-key.pem` (its key, mode 0600, needed only to issue). The CA records its trust domain as
//! its own URI SAN `spiffe://<trust-domain>`, so issuing needs no repeated trust domain.
//!
//! A gateway certificate (`<out>/<zone>-<name>.pem`, key `<out>/<zone>-<name>-key.pem`, mode
//! 0600) carries the URI SAN `spiffe://<td>/zone/<zone>/gateway/<name>` and the DNS SAN
//! `<name>.<zone>.gateway.keyway` ([`crate::tls::server_name`]), both extended key usages
//! (server and client: every gateway is both ends of the overlay), and no CA rights. Issuing again
//! replaces the files (renewal); creating a CA never replaces one unless forced.
//!
//! A workload certificate names `spiffe://<td>/ns/<namespace>/sa/<service account>`: a mesh
//! workload's ([`Ca::issue_workload`], server and client use, as istiod issues) or a device's
//! ([`Ca::issue_identity`] with [`WorkloadUse::Device`], client use only: a `keyway agent` outside the clusters, whose identity is
//! that of its `WorkloadEntry` in the inventory). Revocation lists: [`crl`].
//!
//! Validity: the CA 10 years, gateway certificates 1 year, devices 90 days, all configurable;
//! `not_before` is set an hour back to tolerate clock skew between machines. A certificate never
//! outlives its CA.

pub mod crl;

pub use crl::{CRL_FILE, CRL_VALIDITY_DAYS, Revocation, load_crls, refresh_crl, revoke};

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::secrets::{PRIVATE_FILE_MODE, Replace, write_file_atomic};
use crate::tls::{GatewayIdentity, check_trust_domain, server_name};

/// The CA certificate's file name in a CA directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// The CA key's file name in a CA directory.
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// The default validity of a CA (10 years).
pub const CA_VALIDITY_DAYS: u32 = 3650;
/// The default validity of a gateway certificate (1 year).
pub const GATEWAY_VALIDITY_DAYS: u32 = 365;
/// The default validity of a device certificate (90 days: a laptop is lost more easily than a
/// gateway; renew with `keyway ca issue-device` again).
pub const DEVICE_VALIDITY_DAYS: u32 = 90;
/// The longest validity keyway issues (100 years).
pub const MAX_VALIDITY_DAYS: u32 = 36_500;
/// The default trust domain.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// How far back `not_before` is set, for clocks that run behind.
const BACKDATE: Duration = Duration::from_secs(3600);
/// The mode of certificate files (public).
const CERT_FILE_MODE: u32 = 0o644;
const SECONDS_PER_DAY: u64 = 86_400;
/// The CA's common name (the trust domain follows).
const CA_COMMON_NAME: &str = "keyway overlay CA";
const ORGANIZATION: &str = "keyway";

/// Why a CA could not be created or loaded, or a certificate not issued.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// The CA files exist and `force` was not given.
    #[error(
        "{path}: a CA already exists; refusing to replace it (`keyway ca init --force` replaces it, and \
         every gateway certificate it issued stops being trusted)"
    )]
    Exists {
        /// The existing file.
        path: String,
    },
    /// A file could not be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file could not be written.
    #[error("{path}: cannot write: {source}")]
    Write {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The CA files are not a keyway CA.
    #[error("{path}: {reason}")]
    BadCa {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// A trust domain, zone or name is not acceptable.
    #[error("{0}")]
    BadName(String),
    /// A validity period is out of range.
    #[error("validity of {days} days: must be 1 to {MAX_VALIDITY_DAYS} days")]
    BadValidity {
        /// The days asked.
        days: u32,
    },
    /// The certificate asked for would outlive its CA, or the CA has expired.
    #[error("{reason}")]
    CaExpiry {
        /// What is wrong and what to do.
        reason: String,
    },
    /// The trust domain given is not the CA's.
    #[error("trust domain {given:?} is not the CA's, {ca:?}")]
    WrongTrustDomain {
        /// The trust domain asked for.
        given: String,
        /// The CA's.
        ca: String,
    },
    /// rcgen failed (key generation, encoding).
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// The certificate to revoke was not issued by this CA.
    #[error("{path}: {reason}")]
    NotIssuedByCa {
        /// The certificate file.
        path: String,
        /// Why, and what to do.
        reason: String,
    },
    /// The revocation list file is not one this CA signed.
    #[error("{path}: {reason}")]
    BadCrl {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The operating system gave no random bytes.
    #[error("cannot draw random bytes from the operating system: {0}")]
    Random(String),
}

/// The two files of a CA directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaFiles {
    /// `<dir>/ca.pem`.
    pub cert: PathBuf,
    /// `<dir>/ca-key.pem`.
    pub key: PathBuf,
}

impl CaFiles {
    /// The CA files of `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        CaFiles { cert: dir.join(CA_CERT_FILE), key: dir.join(CA_KEY_FILE) }
    }
}

/// The files of an issued gateway certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuedPaths {
    /// `<out>/<zone>-<name>.pem`.
    pub cert: PathBuf,
    /// `<out>/<zone>-<name>-key.pem` (mode 0600).
    pub key: PathBuf,
}

impl IssuedPaths {
    /// The files of gateway `zone`/`name` in `out`.
    pub fn in_dir(out: &Path, zone: &str, name: &str) -> Self {
        IssuedPaths { cert: out.join(format!("{zone}-{name}.pem")), key: out.join(format!("{zone}-{name}-key.pem")) }
    }
}

/// What a workload certificate is for: its extended key usages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkloadUse {
    /// A mesh workload (a sidecar, a gateway's mesh side): server and client.
    Mesh,
    /// A device outside the clusters (`keyway agent`): client only; it dials its edge gateway and
    /// never serves TLS.
    Device,
}

impl WorkloadUse {
    fn extended_key_usages(self) -> Vec<ExtendedKeyUsagePurpose> {
        match self {
            WorkloadUse::Mesh => vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
            WorkloadUse::Device => vec![ExtendedKeyUsagePurpose::ClientAuth],
        }
    }
}

/// A CA in memory: its certificate, key and trust domain. `Debug` does not show the key.
pub struct Ca {
    cert_pem: String,
    key: KeyPair,
    /// Rebuilt from the certificate: what rcgen needs to sign as this CA.
    issuer_params: CertificateParams,
    /// The subject of the certificate, DER: every issued certificate's issuer must equal it.
    subject_der: Vec<u8>,
    trust_domain: String,
    not_after_unix: i64,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .field("not_after_unix", &self.not_after_unix)
            .field("key", &"[redacted]")
            .finish()
    }
}

/// A gateway certificate and key in memory. `Debug` does not show the key.
pub struct IssuedCert {
    /// Whose it is.
    pub identity: GatewayIdentity,
    /// The certificate, PEM.
    pub cert_pem: String,
    key_pem: String,
    /// When it expires (unix seconds).
    pub not_after_unix: i64,
}

impl fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCert")
            .field("identity", &self.identity.spiffe_id())
            .field("not_after_unix", &self.not_after_unix)
            .field("key", &"[redacted]")
            .finish()
    }
}

impl IssuedCert {
    /// The private key, PKCS#8 PEM.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Writes `<out>/<zone>-<name>.pem` (0644) and `<out>/<zone>-<name>-key.pem` (0600),
    /// each atomically, replacing earlier ones; the key first, so a certificate on disk always
    /// has its key beside it.
    pub fn save(&self, out: &Path) -> Result<IssuedPaths, CaError> {
        let paths = IssuedPaths::in_dir(out, &self.identity.zone, &self.identity.name);
        write(&paths.key, &self.key_pem, PRIVATE_FILE_MODE, Replace::Yes)?;
        write(&paths.cert, &self.cert_pem, CERT_FILE_MODE, Replace::Yes)?;
        Ok(paths)
    }
}

fn write(path: &Path, text: &str, mode: u32, replace: Replace) -> Result<(), CaError> {
    write_file_atomic(path, text.as_bytes(), mode, replace).map_err(|source| {
        if source.kind() == std::io::ErrorKind::AlreadyExists {
            CaError::Exists { path: path.display().to_string() }
        } else {
            CaError::Write { path: path.display().to_string(), source }
        }
    })
}

fn check_days(days: u32) -> Result<(), CaError> {
    if days == 0 || days > MAX_VALIDITY_DAYS {
        return Err(CaError::BadValidity { days });
    }
    Ok(())
}

fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// `not_before` and `not_after` for `days` from `now`, in unix seconds.
fn validity(now: SystemTime, days: u32) -> (u64, u64) {
    let now = unix_seconds(now);
    (now.saturating_sub(BACKDATE.as_secs()), now + u64::from(days) * SECONDS_PER_DAY)
}

/// Sets the validity period of `params` (unix seconds; both below year 9999 by the day limit).
fn set_validity(params: &mut CertificateParams, not_before: u64, not_after: u64) {
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + Duration::from_secs(not_before);
    params.not_after = epoch + Duration::from_secs(not_after);
}

/// A random positive serial number of 16 bytes (RFC 5280: at most 20, unpredictable).
fn serial() -> Result<SerialNumber, CaError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| CaError::Random(e.to_string()))?;
    // Positive, and minimally encoded (no leading zero byte).
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

/// The distinguished name of a CA: `O=keyway, CN=keyway overlay CA <td> <8 random hex digits>`;
/// the random part tells two CAs of one trust domain apart (in a trust bundle, in messages).
fn ca_name(trust_domain: &str) -> Result<DistinguishedName, CaError> {
    let mut tag = [0u8; 4];
    getrandom::fill(&mut tag).map_err(|e| CaError::Random(e.to_string()))?;
    let tag: String = tag.iter().map(|b| format!("{b:02x}")).collect();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, ORGANIZATION);
    dn.push(DnType::CommonName, format!("{CA_COMMON_NAME} {trust_domain} {tag}"));
    Ok(dn)
}

fn ca_params(trust_domain: &str) -> Result<CertificateParams, CaError> {
    let mut p = CertificateParams::default();
    p.distinguished_name = ca_name(trust_domain)?;
    p.subject_alt_names = vec![SanType::URI(format!("spiffe://{trust_domain}").try_into()?)];
    // Path length 0: it signs gateway certificates, never another CA.
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    Ok(p)
}

impl Ca {
    /// A new CA for `trust_domain`, valid `days` from `now`, with a new P-256 key.
    pub fn generate(trust_domain: &str, days: u32, now: SystemTime) -> Result<Ca, CaError> {
        check_trust_domain(trust_domain).map_err(CaError::BadName)?;
        check_days(days)?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = ca_params(trust_domain)?;
        params.serial_number = Some(serial()?);
        let (not_before, not_after) = validity(now, days);
        set_validity(&mut params, not_before, not_after);
        let cert = params.self_signed(&key)?;
        Self::from_pem(&cert.pem(), &key.serialize_pem(), "ca.pem", "ca-key.pem")
    }

    /// Loads the CA of directory `dir` (`ca.pem`, `ca-key.pem`); checks that the key is the
    /// certificate's and that the certificate is a CA with a trust domain.
    pub fn load(dir: &Path) -> Result<Ca, CaError> {
        let files = CaFiles::in_dir(dir);
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| CaError::Read { path: p.display().to_string(), source })
        };
        let (cert_pem, key_pem) = (read(&files.cert)?, read(&files.key)?);
        Self::from_pem(&cert_pem, &key_pem, &files.cert.display().to_string(), &files.key.display().to_string())
    }

    /// A CA from its certificate and key in PEM; `cert_path` and `key_path` name them in errors.
    pub fn from_pem(cert_pem: &str, key_pem: &str, cert_path: &str, key_path: &str) -> Result<Ca, CaError> {
        let bad = |path: &str, reason: String| CaError::BadCa { path: path.to_owned(), reason };
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| bad(cert_path, format!("no CA certificate in PEM form: {e}")))?;
        let key = KeyPair::from_pem(key_pem).map_err(|e| bad(key_path, format!("not a PKCS#8 private key: {e}")))?;
        let (_, x509) = X509Certificate::from_der(&der).map_err(|e| bad(cert_path, format!("not valid X.509: {e}")))?;
        if !x509.is_ca() {
            return Err(bad(cert_path, "not a CA certificate (basic constraints say CA:false)".into()));
        }
        if x509.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(bad(key_path, format!("not the key of the CA certificate in {cert_path}")));
        }
        let san = x509.subject_alternative_name().map_err(|e| bad(cert_path, format!("subject alt names: {e}")))?;
        let trust_domains: Vec<&str> = san
            .map(|s| s.value.general_names.iter())
            .into_iter()
            .flatten()
            .filter_map(|n| match n {
                GeneralName::URI(u) => u.strip_prefix("spiffe://"),
                _ => None,
            })
            .collect();
        let [trust_domain] = trust_domains.as_slice() else {
            return Err(bad(
                cert_path,
                "a keyway CA names its trust domain in exactly one URI SAN spiffe://<trust-domain>; create one \
                 with `keyway ca init`"
                    .into(),
            ));
        };
        check_trust_domain(trust_domain).map_err(|e| bad(cert_path, e))?;
        let mut issuer_params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        for attr in x509.subject().iter_attributes() {
            let value = attr.as_str().map_err(|e| bad(cert_path, format!("subject attribute is not text: {e}")))?;
            let oid: Vec<u64> = attr
                .attr_type()
                .iter()
                .ok_or_else(|| bad(cert_path, "subject attribute type is not a valid OID".into()))?
                .collect();
            dn.push(DnType::from_oid(&oid), DnValue::Utf8String(value.to_owned()));
        }
        issuer_params.distinguished_name = dn;
        issuer_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        Ok(Ca {
            cert_pem: cert_pem.to_owned(),
            subject_der: x509.subject().as_raw().to_vec(),
            trust_domain: (*trust_domain).to_owned(),
            not_after_unix: x509.validity().not_after.timestamp(),
            key,
            issuer_params,
        })
    }

    /// The trust domain the CA issues identities in.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The CA certificate, PEM (what gateways trust).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// When the CA expires (unix seconds).
    pub fn not_after_unix(&self) -> i64 {
        self.not_after_unix
    }

    /// Writes `ca-key.pem` (0600) and `ca.pem` into `dir` (created if missing), atomically.
    /// Without `force`, refuses when either file exists and never touches it.
    pub fn save(&self, dir: &Path, force: bool) -> Result<CaFiles, CaError> {
        let files = CaFiles::in_dir(dir);
        std::fs::create_dir_all(dir).map_err(|source| CaError::Write { path: dir.display().to_string(), source })?;
        let replace = if force { Replace::Yes } else { Replace::No };
        if !force {
            for p in [&files.cert, &files.key] {
                if p.exists() {
                    return Err(CaError::Exists { path: p.display().to_string() });
                }
            }
        }
        write(&files.key, &self.key.serialize_pem(), PRIVATE_FILE_MODE, replace)?;
        write(&files.cert, &self.cert_pem, CERT_FILE_MODE, replace)?;
        Ok(files)
    }

    /// Issues the certificate of gateway `name` of `zone`, valid `days` from `now`, with a new
    /// P-256 key. Refuses when the certificate would outlive the CA.
    pub fn issue(&self, zone: &str, name: &str, days: u32, now: SystemTime) -> Result<IssuedCert, CaError> {
        let identity =
            GatewayIdentity::new(&self.trust_domain, zone, name).map_err(|e| CaError::BadName(e.to_string()))?;
        let (not_before, not_after) = self.validity_within(days, now)?;
        let host = server_name(&identity);
        // Its own server name, and its zone's (dialled through a zone's `entry`).
        let zone_host = crate::tls::zone_server_name(zone);
        let sans = vec![
            SanType::URI(identity.spiffe_id().try_into()?),
            SanType::DnsName(host.as_str().try_into()?),
            SanType::DnsName(zone_host.as_str().try_into()?),
        ];
        let (cert_pem, key_pem) = self.sign(&host, sans, WorkloadUse::Mesh, not_before, not_after)?;
        Ok(IssuedCert { identity, cert_pem, key_pem, not_after_unix: i64::try_from(not_after).unwrap_or(i64::MAX) })
    }

    /// Refuses a certificate valid `days` from `now` that would outlive the CA; returns its
    /// validity period (unix seconds).
    fn validity_within(&self, days: u32, now: SystemTime) -> Result<(u64, u64), CaError> {
        check_days(days)?;
        let (not_before, not_after) = validity(now, days);
        let ca_end = u64::try_from(self.not_after_unix).unwrap_or(0);
        if unix_seconds(now) >= ca_end {
            return Err(CaError::CaExpiry {
                reason: format!("the CA expired at unix {ca_end}; create a new one with `keyway ca init --force`"),
            });
        }
        if not_after > ca_end {
            let left = (ca_end - unix_seconds(now)) / SECONDS_PER_DAY;
            return Err(CaError::CaExpiry {
                reason: format!(
                    "a certificate valid {days} days would outlive the CA, which expires in {left} days; \
                     ask for --days {left} or less, or create a new CA"
                ),
            });
        }
        Ok((not_before, not_after))
    }

    /// Signs a leaf certificate (server and client use, or client only for a device) with a new
    /// P-256 key; returns the certificate and the key, PEM.
    fn sign(
        &self,
        common_name: &str,
        sans: Vec<SanType>,
        usage: WorkloadUse,
        not_before: u64,
        not_after: u64,
    ) -> Result<(String, String), CaError> {
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, ORGANIZATION);
        dn.push(DnType::CommonName, common_name);
        p.distinguished_name = dn;
        p.subject_alt_names = sans;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = usage.extended_key_usages();
        p.use_authority_key_identifier_extension = true;
        p.serial_number = Some(serial()?);
        set_validity(&mut p, not_before, not_after);
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let issuer = Issuer::from_params(&self.issuer_params, &self.key);
        let cert = p.signed_by(&key, &issuer)?;
        // The issuer name must be the CA's subject byte for byte, or no verifier chains it.
        let (_, leaf) = X509Certificate::from_der(cert.der())
            .map_err(|e| CaError::BadCa { path: "issued certificate".into(), reason: e.to_string() })?;
        if leaf.issuer().as_raw() != self.subject_der.as_slice() {
            return Err(CaError::BadCa {
                path: CA_CERT_FILE.into(),
                reason: "its subject name cannot be reproduced byte for byte; create the CA with `keyway ca init`"
                    .into(),
            });
        }
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Issues a mesh workload certificate, as istiod issues one to a sidecar: the one SAN
    /// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`, valid `days` from `now`,
    /// a new P-256 key. For a mesh without Istio (the test beds, the demo) and for the gateway's
    /// own mesh certificate there; returns the certificate and key, PEM.
    pub fn issue_workload(
        &self,
        namespace: &str,
        service_account: &str,
        days: u32,
        now: SystemTime,
    ) -> Result<(String, String), CaError> {
        self.issue_identity(namespace, service_account, WorkloadUse::Mesh, days, now)
    }

    /// Issues a certificate of `spiffe://<trust domain>/ns/<namespace>/sa/<service account>` for
    /// `usage`: a mesh workload's ([`Ca::issue_workload`]) or, from the overlay CA, a device's (a
    /// `keyway agent` outside the clusters, the identity of its `WorkloadEntry`, client use only);
    /// valid `days` from `now`, a new P-256 key; returns the certificate and key, PEM.
    pub fn issue_identity(
        &self,
        namespace: &str,
        service_account: &str,
        usage: WorkloadUse,
        days: u32,
        now: SystemTime,
    ) -> Result<(String, String), CaError> {
        for (what, v) in [("namespace", namespace), ("service account", service_account)] {
            let ok = !v.is_empty()
                && v.len() <= 253
                && v.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
            if !ok {
                return Err(CaError::BadName(format!(
                    "{what} {v:?}: expected a Kubernetes name (lower-case letters, digits, '-', '.')"
                )));
            }
        }
        let (not_before, not_after) = self.validity_within(days, now)?;
        let id = format!("spiffe://{}/ns/{namespace}/sa/{service_account}", self.trust_domain);
        self.sign(
            &format!("{service_account}.{namespace}"),
            vec![SanType::URI(id.as_str().try_into()?)],
            usage,
            not_before,
            not_after,
        )
    }
}

/// Creates a CA for `trust_domain` (10 years) in directory `out`; refuses to replace an existing
/// one (`keyway ca init --force` does, through [`init_ca_with`]).
pub fn init_ca(out: &Path, trust_domain: &str) -> Result<(), CaError> {
    init_ca_with(out, trust_domain, CA_VALIDITY_DAYS, false).map(|_| ())
}

/// As [`init_ca`], with the validity in days and whether to replace an existing CA.
pub fn init_ca_with(out: &Path, trust_domain: &str, days: u32, force: bool) -> Result<CaFiles, CaError> {
    if !force {
        for p in [out.join(CA_CERT_FILE), out.join(CA_KEY_FILE)] {
            if p.exists() {
                return Err(CaError::Exists { path: p.display().to_string() });
            }
        }
    }
    Ca::generate(trust_domain, days, SystemTime::now())?.save(out, force)
}

/// Issues the certificate of gateway `name` of `zone` (1 year) from the CA in `ca_dir` into
/// `out` (`<zone>-<name>.pem`, `<zone>-<name>-key.pem`). `trust_domain` must be the CA's.
pub fn issue_gateway(
    ca_dir: &Path,
    trust_domain: &str,
    zone: &str,
    name: &str,
    out: &Path,
) -> Result<IssuedPaths, CaError> {
    let ca = Ca::load(ca_dir)?;
    if ca.trust_domain() != trust_domain {
        return Err(CaError::WrongTrustDomain { given: trust_domain.to_owned(), ca: ca.trust_domain().to_owned() });
    }
    issue_gateway_with(&ca, zone, name, GATEWAY_VALIDITY_DAYS, out).map(|(paths, _)| paths)
}

/// Issues with a loaded CA and a validity in days, writes the files into `out` (created if
/// missing), and returns their paths with the certificate.
pub fn issue_gateway_with(
    ca: &Ca,
    zone: &str,
    name: &str,
    days: u32,
    out: &Path,
) -> Result<(IssuedPaths, IssuedCert), CaError> {
    let issued = ca.issue(zone, name, days, SystemTime::now())?;
    std::fs::create_dir_all(out).map_err(|source| CaError::Write { path: out.display().to_string(), source })?;
    let paths = issued.save(out)?;
    Ok((paths, issued))
}

/// Issues a mesh workload certificate ([`Ca::issue_workload`]) with a loaded CA into `out`
/// (created if missing): `<namespace>-<service account>.pem` (0644) and `…-key.pem` (0600),
/// replacing earlier ones, the key first.
pub fn issue_workload_with(
    ca: &Ca,
    namespace: &str,
    service_account: &str,
    days: u32,
    out: &Path,
) -> Result<IssuedPaths, CaError> {
    issue_identity_with(ca, namespace, service_account, WorkloadUse::Mesh, days, out)
}

/// Issues a certificate of `usage` ([`Ca::issue_identity`]) with a loaded CA into `out`, as
/// [`issue_workload_with`] does; `keyway ca issue-device` with [`WorkloadUse::Device`].
pub fn issue_identity_with(
    ca: &Ca,
    namespace: &str,
    service_account: &str,
    usage: WorkloadUse,
    days: u32,
    out: &Path,
) -> Result<IssuedPaths, CaError> {
    let (cert, key) = ca.issue_identity(namespace, service_account, usage, days, SystemTime::now())?;
    std::fs::create_dir_all(out).map_err(|source| CaError::Write { path: out.display().to_string(), source })?;
    let paths = IssuedPaths::in_dir(out, namespace, service_account);
    write(&paths.key, &key, PRIVATE_FILE_MODE, Replace::Yes)?;
    write(&paths.cert, &cert, CERT_FILE_MODE, Replace::Yes)?;
    Ok(paths)
}

/// The UTC date `YYYY-MM-DD` of a unix time in seconds (for messages; proleptic Gregorian).
pub fn utc_date(unix_secs: i64) -> String {
    // Howard Hinnant's civil_from_days.
    let z = unix_secs.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

#[cfg(test)]
mod tests;
