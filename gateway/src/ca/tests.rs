//! Tests of the CA, gateway, workload and device certificates.

use super::*;
use crate::tls::TlsMaterial;
use std::os::unix::fs::PermissionsExt as _;

fn tmpdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("keyway-ca-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A new CA of trust domain `td` in a fresh directory `name`.
pub(super) fn new_ca(name: &str, td: &str) -> (PathBuf, Ca) {
    let dir = tmpdir(name);
    init_ca(&dir, td).unwrap();
    let ca = Ca::load(&dir).unwrap();
    (dir, ca)
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn init_then_issue_gives_loadable_material() {
    let dir = tmpdir("flow");
    init_ca(&dir, "example.org").unwrap();
    let files = CaFiles::in_dir(&dir);
    assert_eq!(mode(&files.key), 0o600);
    assert_eq!(mode(&files.cert), 0o644);
    let ca = Ca::load(&dir).unwrap();
    assert_eq!(ca.trust_domain(), "example.org");
    let out = dir.join("gw");
    let paths = issue_gateway(&dir, "example.org", "zone-a", "gw-1", &out).unwrap();
    assert_eq!(paths, IssuedPaths { cert: out.join("zone-a-gw-1.pem"), key: out.join("zone-a-gw-1-key.pem") });
    assert_eq!(mode(&paths.key), 0o600);
    let m = TlsMaterial::load(&files.cert, &paths.cert, &paths.key).unwrap();
    let id = m.identity().unwrap();
    assert_eq!(id.spiffe_id(), "spiffe://example.org/zone/zone-a/gateway/gw-1");
    // Only the CA certificate and the gateway files; no temporaries, no key copies.
    let mut names: Vec<String> =
        std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, ["zone-a-gw-1-key.pem", "zone-a-gw-1.pem"]);
}

#[test]
fn init_refuses_to_replace_unless_forced() {
    let dir = tmpdir("refuse");
    init_ca(&dir, "td").unwrap();
    let before = std::fs::read_to_string(dir.join(CA_KEY_FILE)).unwrap();
    let err = init_ca(&dir, "td").unwrap_err().to_string();
    assert!(err.contains("already exists") && err.contains("--force"), "{err}");
    assert_eq!(std::fs::read_to_string(dir.join(CA_KEY_FILE)).unwrap(), before);
    init_ca_with(&dir, "td", 10, true).unwrap();
    assert_ne!(std::fs::read_to_string(dir.join(CA_KEY_FILE)).unwrap(), before);
    // A lone key file is enough to refuse.
    let lone = tmpdir("lone");
    std::fs::write(lone.join(CA_KEY_FILE), "x").unwrap();
    assert!(matches!(init_ca(&lone, "td"), Err(CaError::Exists { .. })));
}

#[test]
fn issue_checks_names_trust_domain_and_validity() {
    let ca = Ca::generate("td", 30, SystemTime::now()).unwrap();
    let now = SystemTime::now();
    for (zone, name) in [("Zone", "a"), ("z", ""), ("z", "-a"), ("z_1", "a"), ("z", &"a".repeat(64))] {
        assert!(matches!(ca.issue(zone, name, 1, now), Err(CaError::BadName(_))), "{zone} {name}");
    }
    assert!(matches!(ca.issue("z", "a", 0, now), Err(CaError::BadValidity { days: 0 })));
    let err = ca.issue("z", "a", 365, now).unwrap_err().to_string();
    assert!(err.contains("outlive the CA") && err.contains("ask for --days"), "{err}");
    let later = now + Duration::from_secs(40 * SECONDS_PER_DAY);
    assert!(ca.issue("z", "a", 1, later).unwrap_err().to_string().contains("the CA expired"));
    assert!(matches!(Ca::generate("Bad TD", 1, now), Err(CaError::BadName(_))));

    let dir = tmpdir("td");
    ca.save(&dir, false).unwrap();
    let err = issue_gateway(&dir, "other", "z", "a", &dir).unwrap_err();
    assert!(matches!(err, CaError::WrongTrustDomain { .. }), "{err}");
}

#[test]
fn load_refuses_a_mismatched_key_and_a_non_ca() {
    let a = Ca::generate("td", 10, SystemTime::now()).unwrap();
    let b = Ca::generate("td", 10, SystemTime::now()).unwrap();
    let err = Ca::from_pem(a.cert_pem(), &b.key.serialize_pem(), "ca.pem", "ca-key.pem").unwrap_err();
    assert!(err.to_string().starts_with("ca-key.pem: not the key of the CA certificate"), "{err}");
    let leaf = a.issue("z", "g", 1, SystemTime::now()).unwrap();
    let err = Ca::from_pem(&leaf.cert_pem, leaf.key_pem(), "ca.pem", "ca-key.pem").unwrap_err();
    assert!(err.to_string().contains("not a CA certificate"), "{err}");
    let missing = tmpdir("missing");
    assert!(Ca::load(&missing).unwrap_err().to_string().contains("ca.pem: cannot read"));
}

#[test]
fn utc_dates() {
    assert_eq!(utc_date(0), "1970-01-01");
    assert_eq!(utc_date(951_782_400), "2000-02-29");
    assert_eq!(utc_date(1_767_225_599), "2025-12-31");
    assert_eq!(utc_date(-86_400), "1969-12-31");
}

#[test]
fn issued_certificate_has_the_expected_shape() {
    let ca = Ca::generate("cluster.local", CA_VALIDITY_DAYS, SystemTime::now()).unwrap();
    let now = SystemTime::now();
    let issued = ca.issue("zone-b", "gw-2", 7, now).unwrap();
    let der = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
    let (_, x) = X509Certificate::from_der(&der).unwrap();
    assert!(!x.is_ca());
    let names: Vec<String> =
        x.subject_alternative_name().unwrap().unwrap().value.general_names.iter().map(|n| format!("{n}")).collect();
    assert_eq!(
        names,
        [
            "URI(spiffe://cluster.local/zone/zone-b/gateway/gw-2)",
            "DNSName(gw-2.zone-b.gateway.keyway)",
            "DNSName(zone-b.gateway.keyway)"
        ]
    );
    let eku = x.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    let span = x.validity().not_after.timestamp() - x.validity().not_before.timestamp();
    assert_eq!(span, 7 * 86_400 + 3600);
    assert!(format!("{issued:?} {ca:?}").contains("[redacted]"));
    assert!(!format!("{issued:?}").contains("PRIVATE KEY"));
}

#[test]
fn device_certificate_is_a_client_only_workload_identity() {
    let (dir, ca) = new_ca("device", "example.org");
    let out = dir.join("devices");
    let paths = issue_identity_with(&ca, "field", "laptop-7", WorkloadUse::Device, DEVICE_VALIDITY_DAYS, &out).unwrap();
    assert_eq!(paths, IssuedPaths::in_dir(&out, "field", "laptop-7"));
    assert_eq!(paths.cert, out.join("field-laptop-7.pem"));
    assert_eq!(mode(&paths.key), 0o600);
    let pem = std::fs::read_to_string(&paths.cert).unwrap();
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    let (_, x) = X509Certificate::from_der(&der).unwrap();
    assert!(!x.is_ca());
    let names: Vec<String> =
        x.subject_alternative_name().unwrap().unwrap().value.general_names.iter().map(|n| format!("{n}")).collect();
    assert_eq!(names, ["URI(spiffe://example.org/ns/field/sa/laptop-7)"]);
    let eku = x.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && !eku.server_auth, "a device is a client only");
    let span = x.validity().not_after.timestamp() - x.validity().not_before.timestamp();
    assert_eq!(span, 90 * 86_400 + 3600);
    let ca_der = CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).unwrap();
    let (_, ca_x) = X509Certificate::from_der(&ca_der).unwrap();
    assert!(x.verify_signature(Some(ca_x.public_key())).is_ok(), "signed by the overlay CA");
    // A mesh workload certificate of the same identity serves too.
    let (mesh, _) = ca.issue_workload("field", "laptop-7", 1, SystemTime::now()).unwrap();
    let der = CertificateDer::from_pem_slice(mesh.as_bytes()).unwrap();
    let (_, x) = X509Certificate::from_der(&der).unwrap();
    let eku = x.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && eku.server_auth);
    assert!(matches!(
        ca.issue_identity("Field", "x", WorkloadUse::Device, 1, SystemTime::now()),
        Err(CaError::BadName(_))
    ));
    assert!(matches!(
        ca.issue_identity("f", "x", WorkloadUse::Device, 0, SystemTime::now()),
        Err(CaError::BadValidity { days: 0 })
    ));
}
