//! Revocation: `<CA dir>/revoked.pem`, one X.509 CRL (PEM) signed by the CA, listing every
//! certificate of that CA revoked so far. The overlay CA (gateways, devices) and a mesh CA of
//! `keyway ca init` (pods, where no Istio issues) keep one each.
//!
//! [`revoke`] (`keyway ca revoke --ca DIR --cert FILE`) reads the existing list, checked to be
//! this CA's, adds the certificate's serial (refusing a certificate the CA did not issue, or the
//! CA's own), and signs a new list: CRL number one more than the last, `thisUpdate` now,
//! `nextUpdate` [`CRL_VALIDITY_DAYS`] later. [`refresh_crl`] (`--refresh`) signs the same entries
//! again with new dates and number, and writes an empty list where none exists.
//!
//! Gateways load the file with [`load_crls`] and hand it to rustls' `WebPkiClientVerifier`
//! (`with_crls`). They use a list whatever its `nextUpdate`: rustls ignores it by default, and
//! keyway keeps that default, since refusing every device because nobody re-signed the list in
//! time would be an outage, and ignoring an old list would bring revoked certificates back.
//! `nextUpdate` is only a reminder (re-sign weekly, for tools that check it). With lists given,
//! rustls refuses a certificate whose issuer has no list among them, so the file a listener loads
//! must hold a list of every CA it accepts certificates from (`--refresh` writes an empty one).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{CertificateRevocationListParams, Issuer, KeyIdMethod, RevokedCertParams, SerialNumber};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer};
use x509_parser::prelude::{CertificateRevocationList, FromDer, X509Certificate};

use super::{CERT_FILE_MODE, Ca, CaError, SECONDS_PER_DAY, unix_seconds, write};
use crate::secrets::Replace;

/// The revocation list's file name in a CA directory.
pub const CRL_FILE: &str = "revoked.pem";
/// How long a revocation list says it is current (`nextUpdate` - `thisUpdate`): 7 days.
pub const CRL_VALIDITY_DAYS: u32 = 7;

/// What [`revoke`] or [`refresh_crl`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revocation {
    /// `<CA dir>/revoked.pem`.
    pub path: PathBuf,
    /// The serial number revoked, lower-case hex (none for a refresh).
    pub serial: Option<String>,
    /// Whether that serial was on the list already.
    pub already_revoked: bool,
    /// How many certificates the list names.
    pub revoked: usize,
    /// The new list's CRL number.
    pub crl_number: u64,
    /// The new list's `nextUpdate` (unix seconds).
    pub next_update_unix: u64,
}

/// A revoked certificate: its serial (minimal, no leading zero byte) and when it was revoked.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    serial: Vec<u8>,
    revoked_unix: u64,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A serial's content octets without the leading zero bytes DER adds for the sign.
fn minimal(serial: &[u8]) -> Vec<u8> {
    let start = serial.iter().position(|b| *b != 0).unwrap_or(serial.len().saturating_sub(1));
    serial[start..].to_vec()
}

impl Ca {
    /// The CA certificate, parsed (for its public key).
    fn parsed_cert<'a>(&self, der: &'a CertificateDer<'static>) -> Result<X509Certificate<'a>, CaError> {
        X509Certificate::from_der(der)
            .map(|(_, x)| x)
            .map_err(|e| CaError::BadCa { path: super::CA_CERT_FILE.into(), reason: e.to_string() })
    }

    fn cert_der(&self) -> Result<CertificateDer<'static>, CaError> {
        CertificateDer::from_pem_slice(self.cert_pem.as_bytes())
            .map_err(|e| CaError::BadCa { path: super::CA_CERT_FILE.into(), reason: e.to_string() })
    }

    /// The serial number of the (first) certificate of `pem`, refused unless this CA signed it
    /// and it is not the CA itself. `path` names it in errors.
    fn issued_serial(&self, pem: &[u8], path: &str) -> Result<Vec<u8>, CaError> {
        let not_ours = |reason: String| CaError::NotIssuedByCa { path: path.to_owned(), reason };
        let der =
            CertificateDer::from_pem_slice(pem).map_err(|e| not_ours(format!("no certificate in PEM form: {e}")))?;
        let (_, cert) = X509Certificate::from_der(&der).map_err(|e| not_ours(format!("not valid X.509: {e}")))?;
        let ca_der = self.cert_der()?;
        let ca = self.parsed_cert(&ca_der)?;
        if cert.issuer().as_raw() != self.subject_der.as_slice()
            || cert.verify_signature(Some(ca.public_key())).is_err()
        {
            return Err(not_ours(format!(
                "not issued by this CA ({}): its issuer is {}; revoke it with the CA that issued it",
                ca.subject(),
                cert.issuer()
            )));
        }
        if cert.is_ca() {
            return Err(not_ours(
                "is the CA certificate itself; to stop trusting it, create a new CA (`keyway ca init --force`)".into(),
            ));
        }
        Ok(minimal(cert.raw_serial()))
    }

    /// The entries and CRL number of the list in `path`, checked to be signed by this CA; none
    /// and 0 when the file does not exist.
    fn read_crl(&self, path: &Path) -> Result<(Vec<Entry>, u64), CaError> {
        let shown = path.display().to_string();
        let pem = match std::fs::read(path) {
            Ok(pem) => pem,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
            Err(source) => return Err(CaError::Read { path: shown, source }),
        };
        let bad = |reason: String| CaError::BadCrl { path: shown.clone(), reason };
        let der = CertificateRevocationListDer::from_pem_slice(&pem)
            .map_err(|e| bad(format!("no revocation list in PEM form: {e}")))?;
        let (_, crl) = CertificateRevocationList::from_der(&der).map_err(|e| bad(format!("not a valid CRL: {e}")))?;
        let ca_der = self.cert_der()?;
        let ca = self.parsed_cert(&ca_der)?;
        if crl.issuer().as_raw() != self.subject_der.as_slice() || crl.verify_signature(ca.public_key()).is_err() {
            return Err(bad(format!(
                "not a revocation list of this CA ({}): issued by {}; move it away to start a new list",
                ca.subject(),
                crl.issuer()
            )));
        }
        let number = match crl.crl_number().map(|n| n.to_u64_digits()) {
            None => 0,
            Some(d) if d.is_empty() => 0,
            Some(d) if d.len() == 1 => d[0],
            Some(_) => return Err(bad("its CRL number does not fit 64 bits".into())),
        };
        let entries = crl
            .iter_revoked_certificates()
            .map(|r| Entry {
                serial: minimal(r.raw_serial()),
                revoked_unix: u64::try_from(r.revocation_date.timestamp()).unwrap_or(0),
            })
            .collect();
        Ok((entries, number))
    }

    /// Signs a revocation list of `entries` with CRL number `number`, current from `now` for
    /// [`CRL_VALIDITY_DAYS`]; returns it in PEM and its `nextUpdate` (unix seconds).
    fn sign_crl(&self, entries: &[Entry], number: u64, now: SystemTime) -> Result<(String, u64), CaError> {
        let epoch = rcgen::date_time_ymd(1970, 1, 1);
        let this_update = unix_seconds(now);
        let next_update = this_update + u64::from(CRL_VALIDITY_DAYS) * SECONDS_PER_DAY;
        let params = CertificateRevocationListParams {
            this_update: epoch + Duration::from_secs(this_update),
            next_update: epoch + Duration::from_secs(next_update),
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs: entries
                .iter()
                .map(|e| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&e.serial),
                    revocation_time: epoch + Duration::from_secs(e.revoked_unix),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&Issuer::from_params(&self.issuer_params, &self.key))?;
        Ok((crl.pem()?, next_update))
    }

    /// Adds `serial` (if given) to the list of `dir` and signs it again.
    fn update_crl(&self, dir: &Path, serial: Option<Vec<u8>>, now: SystemTime) -> Result<Revocation, CaError> {
        let path = dir.join(CRL_FILE);
        let (mut entries, number) = self.read_crl(&path)?;
        let already_revoked = serial.as_ref().is_some_and(|s| entries.iter().any(|e| &e.serial == s));
        if let Some(s) = &serial
            && !already_revoked
        {
            entries.push(Entry { serial: s.clone(), revoked_unix: unix_seconds(now) });
        }
        let crl_number = number + 1;
        let (pem, next_update_unix) = self.sign_crl(&entries, crl_number, now)?;
        write(&path, &pem, CERT_FILE_MODE, Replace::Yes)?;
        Ok(Revocation {
            path,
            serial: serial.as_deref().map(hex),
            already_revoked,
            revoked: entries.len(),
            crl_number,
            next_update_unix,
        })
    }
}

/// Revokes the certificate in file `cert` (PEM; the first certificate of a chain), which the CA
/// of `ca_dir` must have issued: adds its serial to `<ca_dir>/revoked.pem` and signs the list
/// again. Revoking a certificate twice only re-signs the list.
pub fn revoke(ca_dir: &Path, cert: &Path, now: SystemTime) -> Result<Revocation, CaError> {
    let ca = Ca::load(ca_dir)?;
    let pem = std::fs::read(cert).map_err(|source| CaError::Read { path: cert.display().to_string(), source })?;
    let serial = ca.issued_serial(&pem, &cert.display().to_string())?;
    ca.update_crl(ca_dir, Some(serial), now)
}

/// Signs the list of `ca_dir` again (new dates, next CRL number), or writes an empty one.
pub fn refresh_crl(ca_dir: &Path, now: SystemTime) -> Result<Revocation, CaError> {
    Ca::load(ca_dir)?.update_crl(ca_dir, None, now)
}

/// The revocation lists of a PEM file (one or more `X509 CRL` blocks, such as `revoked.pem` of
/// the overlay CA and of a mesh CA put together), for rustls'
/// `WebPkiClientVerifier::builder(roots).with_crls(..)`. Each is checked to parse; their
/// signatures are checked by rustls against the trusted CAs.
pub fn load_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, CaError> {
    let shown = path.display().to_string();
    let pem = std::fs::read(path).map_err(|source| CaError::Read { path: shown.clone(), source })?;
    let bad = |reason: String| CaError::BadCrl { path: shown.clone(), reason };
    let crls = CertificateRevocationListDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not PEM: {e}")))?;
    if crls.is_empty() {
        return Err(bad("no revocation list (-----BEGIN X509 CRL-----); create one with `keyway ca revoke`".into()));
    }
    for (i, der) in crls.iter().enumerate() {
        CertificateRevocationList::from_der(der).map_err(|e| bad(format!("revocation list {}: {e}", i + 1)))?;
    }
    Ok(crls)
}

#[cfg(test)]
mod tests;
