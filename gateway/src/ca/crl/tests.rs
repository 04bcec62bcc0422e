//! Tests of revocation: the list a CA signs, and rustls refusing what it names.

use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, RootCertStore};
use rustls_pki_types::UnixTime;

use super::*;
use crate::ca::tests::new_ca;
use crate::ca::{DEVICE_VALIDITY_DAYS, IssuedPaths, WorkloadUse, issue_gateway_with, issue_identity_with};

fn cert_der(path: &Path) -> CertificateDer<'static> {
    CertificateDer::from_pem_file(path).unwrap()
}

/// A client verifier trusting the CA of `dir`, with the revocation lists given.
fn verifier(
    dir: &Path,
    crls: Vec<CertificateRevocationListDer<'static>>,
) -> Arc<dyn rustls::server::danger::ClientCertVerifier> {
    let mut roots = RootCertStore::empty();
    roots.add(cert_der(&dir.join(crate::ca::CA_CERT_FILE))).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).with_crls(crls).build().unwrap()
}

fn accepts(v: &dyn rustls::server::danger::ClientCertVerifier, cert: &IssuedPaths) -> Result<(), rustls::Error> {
    v.verify_client_cert(&cert_der(&cert.cert), &[], UnixTime::now()).map(|_| ())
}

/// The serial numbers a list names, hex.
fn listed(path: &Path) -> (Vec<String>, u64) {
    let der = CertificateRevocationListDer::from_pem_file(path).unwrap();
    let (_, crl) = CertificateRevocationList::from_der(&der).unwrap();
    let serials = crl.iter_revoked_certificates().map(|r| hex(&minimal(r.raw_serial()))).collect();
    (serials, crl.crl_number().unwrap().to_u64_digits().first().copied().unwrap_or(0))
}

#[test]
fn a_verifier_with_the_list_refuses_the_revoked_certificate_and_accepts_the_others() {
    let (dir, ca) = new_ca("crl-verify", "example.org");
    let out = dir.join("devices");
    let lost = issue_identity_with(&ca, "field", "laptop-1", WorkloadUse::Device, DEVICE_VALIDITY_DAYS, &out).unwrap();
    let kept = issue_identity_with(&ca, "field", "laptop-2", WorkloadUse::Device, DEVICE_VALIDITY_DAYS, &out).unwrap();

    // Without the list both chains verify: the list is what refuses.
    let open = verifier(&dir, Vec::new());
    accepts(open.as_ref(), &lost).unwrap();
    accepts(open.as_ref(), &kept).unwrap();

    let now = SystemTime::now();
    let r = revoke(&dir, &lost.cert, now).unwrap();
    assert_eq!((r.path.clone(), r.revoked, r.crl_number, r.already_revoked), (dir.join(CRL_FILE), 1, 1, false));
    assert_eq!(r.next_update_unix, unix_seconds(now) + 7 * 86_400);
    let crls = load_crls(&r.path).unwrap();
    assert_eq!(crls.len(), 1);
    let v = verifier(&dir, crls);
    assert_eq!(accepts(v.as_ref(), &lost).unwrap_err(), rustls::Error::InvalidCertificate(CertificateError::Revoked));
    accepts(v.as_ref(), &kept).unwrap();
}

#[test]
fn each_revocation_keeps_the_earlier_ones_and_numbers_the_list_up() {
    let (dir, ca) = new_ca("crl-accumulate", "td");
    let out = dir.join("out");
    let a = issue_identity_with(&ca, "ns", "a", WorkloadUse::Device, 1, &out).unwrap();
    let (b, _) = issue_gateway_with(&ca, "zone-a", "gw-1", 1, &out).unwrap();
    let now = SystemTime::now();
    let first = revoke(&dir, &a.cert, now).unwrap();
    let second = revoke(&dir, &b.cert, now).unwrap();
    assert_eq!((second.revoked, second.crl_number), (2, 2));
    let (serials, number) = listed(&second.path);
    assert_eq!(number, 2);
    assert_eq!(serials, [first.serial.clone().unwrap(), second.serial.clone().unwrap()]);
    // Again: nothing added, the list re-signed with the next number.
    let again = revoke(&dir, &a.cert, now).unwrap();
    assert!(again.already_revoked);
    assert_eq!((again.revoked, again.crl_number), (2, 3));
    let refreshed = refresh_crl(&dir, now + Duration::from_secs(86_400)).unwrap();
    assert_eq!((refreshed.revoked, refreshed.crl_number, refreshed.serial), (2, 4, None));
    assert_eq!(listed(&dir.join(CRL_FILE)).0, serials);
}

#[test]
fn refresh_without_a_list_writes_an_empty_one_that_refuses_nothing() {
    let (dir, ca) = new_ca("crl-empty", "td");
    let a = issue_identity_with(&ca, "ns", "a", WorkloadUse::Device, 1, &dir.join("out")).unwrap();
    let r = refresh_crl(&dir, SystemTime::now()).unwrap();
    assert_eq!((r.revoked, r.crl_number), (0, 1));
    let v = verifier(&dir, load_crls(&r.path).unwrap());
    accepts(v.as_ref(), &a).unwrap();
}

#[test]
fn a_certificate_or_list_of_another_ca_is_refused() {
    let ((dir, ca), (other, other_ca)) = (new_ca("crl-mine", "td"), new_ca("crl-other", "td"));
    let foreign = issue_identity_with(&other_ca, "ns", "a", WorkloadUse::Device, 1, &other.join("out")).unwrap();
    let err = revoke(&dir, &foreign.cert, SystemTime::now()).unwrap_err();
    assert!(matches!(err, CaError::NotIssuedByCa { .. }), "{err}");
    assert!(err.to_string().contains("not issued by this CA"), "{err}");
    assert!(!dir.join(CRL_FILE).exists(), "nothing written");

    let err = revoke(&dir, &dir.join(crate::ca::CA_CERT_FILE), SystemTime::now()).unwrap_err().to_string();
    assert!(err.contains("the CA certificate itself"), "{err}");
    let err = revoke(&dir, &dir.join("missing.pem"), SystemTime::now()).unwrap_err().to_string();
    assert!(err.contains("missing.pem: cannot read"), "{err}");

    // The other CA's list in this CA's directory is refused, not extended.
    refresh_crl(&other, SystemTime::now()).unwrap();
    std::fs::copy(other.join(CRL_FILE), dir.join(CRL_FILE)).unwrap();
    let mine = issue_identity_with(&ca, "ns", "b", WorkloadUse::Device, 1, &dir.join("out")).unwrap();
    let err = revoke(&dir, &mine.cert, SystemTime::now()).unwrap_err();
    assert!(
        matches!(err, CaError::BadCrl { .. }) && err.to_string().contains("not a revocation list of this CA"),
        "{err}"
    );
}

#[test]
fn load_crls_reads_every_list_of_a_file_and_refuses_a_file_without_one() {
    let ((a, _), (b, _)) = (new_ca("crl-load-a", "td"), new_ca("crl-load-b", "td"));
    for d in [&a, &b] {
        refresh_crl(d, SystemTime::now()).unwrap();
    }
    let both = a.join("both.pem");
    let text = std::fs::read_to_string(a.join(CRL_FILE)).unwrap() + &std::fs::read_to_string(b.join(CRL_FILE)).unwrap();
    std::fs::write(&both, text).unwrap();
    assert_eq!(load_crls(&both).unwrap().len(), 2);
    let err = load_crls(&a.join(crate::ca::CA_CERT_FILE)).unwrap_err().to_string();
    assert!(err.contains("no revocation list"), "{err}");
    let garbage = a.join("garbage.pem");
    std::fs::write(&garbage, "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n").unwrap();
    assert!(load_crls(&garbage).unwrap_err().to_string().contains("revocation list 1"));
}
