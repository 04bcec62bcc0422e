//! Epoch secrets: the 32-byte secrets, one per key epoch, that every workload key and ticket key
//! derives from (`keyway_policy::auth::keys`). Gateways hold them; nobody else does.
//!
//! The file (written by `keyway keys init` and `keyway keys rotate`, mode 0600, replaced
//! atomically):
//!
//! ```json
//! {"version":1,"epochs":[{"epoch":1,"secret":"<base64url, 32 bytes>","created_ms":1760000000000,"not_after_ms":null}]}
//! ```
//!
//! An epoch is valid while `not_after_ms` is `null` or not yet passed (`now <= not_after_ms`, as
//! [`keyway_policy::keyservice::EpochKey::usable_at`]). A rotation adds epoch `max + 1` and gives
//! the older epochs a `not_after_ms` of `now + overlap`, so both are valid during the overlap:
//! filters that still hold the old workload key keep working until they fetched the new one.
//!
//! Secrets never appear in logs or output: the `Debug` forms are redacted and [`EpochSecrets`]
//! has no public serializer; only [`EpochSecrets::save`] writes them.
//!
//! **File mode.** [`EpochSecrets::load`] warns (it does not refuse) when others may access the
//! file, or its group may write it or is not one of the gateway's own groups: Kubernetes mounts
//! Secret volumes with mode 0644 unless the manifest sets `defaultMode`, and with a pod
//! `fsGroup` a 0400 Secret becomes 0440 owned by that group (which the gateway belongs to), so
//! group read by the gateway's own group is fine. Refusing would turn a hardening hint into an
//! outage. The gateway logs the warning; `keyway keys` prints it on stderr.

use std::fs::{self, OpenOptions};
use std::io::{self, Write as _};
use std::net::IpAddr;
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use keyway_policy::auth::{AuthError, EpochSecret, KEY_LEN};
use keyway_policy::keyservice::{EpochKey, KeyBundle};
use serde::{Deserialize, Serialize};

/// The version of the secrets file this code reads and writes.
pub const FILE_VERSION: u32 = 1;

/// The default overlap of a rotation: how long the previous epoch stays valid (10 minutes; it
/// must exceed the filters' key refresh interval plus the token window).
pub const DEFAULT_OVERLAP_MS: u64 = 10 * 60 * 1000;

/// Whether a secret file's `mode` lets anyone but this process's user and groups read it, or its
/// group write it: other bits, group write, or group read by a group that is not one of `own`.
fn loose_mode(mode: u32, gid: u32, own: &[u32]) -> bool {
    let mode = mode & 0o777;
    mode & 0o007 != 0 || mode & 0o020 != 0 || (mode & 0o070 != 0 && !own.contains(&gid))
}

/// This process's effective group and supplementary groups (Linux: `/proc/self/status`); empty
/// when unreadable, so any group access warns.
fn own_groups() -> Vec<u32> {
    let Ok(status) = fs::read_to_string("/proc/self/status") else { return Vec::new() };
    let field = |name: &str| -> Vec<u32> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|rest| rest.split_whitespace().filter_map(|v| v.parse().ok()).collect())
            .unwrap_or_default()
    };
    let mut out: Vec<u32> = field("Gid:").get(1).copied().into_iter().collect();
    out.extend(field("Groups:"));
    out
}

/// The mode of every file holding a secret or a private key.
pub const PRIVATE_FILE_MODE: u32 = 0o600;

/// Why epoch secrets could not be loaded, saved, rotated or used.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    /// The file could not be read.
    #[error("{path}: cannot read epoch secrets: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: io::Error,
    },
    /// The file is not JSON of the expected shape (serde names the field, line and column).
    #[error("{path}: not an epoch secrets file: {reason}")]
    Parse {
        /// The file.
        path: String,
        /// The parser's reason.
        reason: String,
    },
    /// A field has a value keyway refuses.
    #[error("{path}: {field}: {reason}")]
    Invalid {
        /// The file.
        path: String,
        /// The field (`epochs[1].secret`).
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// The file could not be written.
    #[error("{path}: cannot write: {source}")]
    Write {
        /// The file.
        path: String,
        /// The I/O error.
        source: io::Error,
    },
    /// The file exists and may not be replaced.
    #[error(
        "{path}: already exists; refusing to replace epoch secrets (`keyway keys init --force` replaces them, \
         and every workload key and ticket key derived from them stops verifying)"
    )]
    Exists {
        /// The file.
        path: String,
    },
    /// The operating system gave no random bytes.
    #[error("cannot draw random bytes from the operating system: {0}")]
    Random(String),
    /// Epoch numbers are exhausted.
    #[error(
        "epoch numbers are exhausted (epoch {max} is the last); create new secrets with `keyway keys init --force`"
    )]
    EpochOverflow {
        /// The highest epoch.
        max: u32,
    },
    /// No epoch is valid at the time asked.
    #[error("no epoch secret is valid at {now_ms} ms (every epoch is past its not_after_ms); run `keyway keys rotate`")]
    NoValidEpoch {
        /// The time asked (unix ms).
        now_ms: u64,
    },
    /// A key could not be derived (an identity or zone name too long).
    #[error("cannot derive keys: {0}")]
    Derive(#[from] AuthError),
}

/// One epoch: its number, secret and lifetime.
///
/// `Debug` shows the secret as `EpochSecret([redacted])`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EpochEntry {
    /// The epoch number (from 1).
    pub epoch: u32,
    /// The secret.
    pub secret: EpochSecret,
    /// When it was created (unix ms).
    pub created_ms: u64,
    /// After this instant (unix ms) it is no longer valid; `None`: until a rotation sets one.
    pub not_after_ms: Option<u64>,
}

impl EpochEntry {
    /// Whether the epoch is valid at `now_ms` (`not_after_ms` unset or not yet passed).
    pub fn valid_at(&self, now_ms: u64) -> bool {
        self.not_after_ms.is_none_or(|t| now_ms <= t)
    }
}

/// The epoch secrets of an overlay: at least one epoch, in ascending order, numbers unique.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EpochSecrets {
    entries: Vec<EpochEntry>,
}

/// The file form. Not `Debug`: it holds the secrets in clear.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileForm {
    version: u32,
    epochs: Vec<EntryForm>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryForm {
    epoch: u32,
    secret: String,
    created_ms: u64,
    #[serde(default)]
    not_after_ms: Option<u64>,
}

impl EpochSecrets {
    /// New secrets with one epoch, 1, of 32 random bytes from the operating system.
    pub fn generate(now_ms: u64) -> Result<Self, SecretsError> {
        Ok(EpochSecrets {
            entries: vec![EpochEntry { epoch: 1, secret: random_secret()?, created_ms: now_ms, not_after_ms: None }],
        })
    }

    /// Secrets from entries (any order); refuses an empty list, epoch 0 and repeated epochs.
    pub fn from_entries(entries: Vec<EpochEntry>) -> Result<Self, SecretsError> {
        Self::checked(entries, "<memory>")
    }

    fn checked(mut entries: Vec<EpochEntry>, path: &str) -> Result<Self, SecretsError> {
        let invalid = |field: String, reason: String| SecretsError::Invalid { path: path.to_owned(), field, reason };
        if entries.is_empty() {
            return Err(invalid("epochs".into(), "empty; a secrets file holds at least one epoch".into()));
        }
        for (i, e) in entries.iter().enumerate() {
            if e.epoch == 0 {
                return Err(invalid(format!("epochs[{i}].epoch"), "0 is not an epoch (epochs start at 1)".into()));
            }
            if entries.iter().take(i).any(|o| o.epoch == e.epoch) {
                return Err(invalid(format!("epochs[{i}].epoch"), format!("epoch {} appears twice", e.epoch)));
            }
        }
        entries.sort_by_key(|e| e.epoch);
        Ok(EpochSecrets { entries })
    }

    /// Every epoch, oldest first, valid or not.
    pub fn entries(&self) -> &[EpochEntry] {
        &self.entries
    }

    /// Loads a secrets file. Errors name the file and the field. A file that group or other may
    /// access is loaded with a `tracing` warning (see the module documentation).
    pub fn load(path: &Path) -> Result<Self, SecretsError> {
        let (secrets, warnings) = Self::load_with_warnings(path)?;
        for w in warnings {
            tracing::warn!(path = %path.display(), "{w}");
        }
        Ok(secrets)
    }

    /// As [`EpochSecrets::load`], returning the warnings instead of logging them.
    pub fn load_with_warnings(path: &Path) -> Result<(Self, Vec<String>), SecretsError> {
        let name = path.display().to_string();
        let text = fs::read_to_string(path).map_err(|source| SecretsError::Read { path: name.clone(), source })?;
        let secrets = Self::parse(&text, &name)?;
        let mut warnings = Vec::new();
        if let Ok(meta) = fs::metadata(path)
            && loose_mode(meta.permissions().mode(), meta.gid(), &own_groups())
        {
            let mode = meta.permissions().mode() & 0o777;
            warnings.push(format!(
                "{name}: mode {mode:04o} (group {}) lets others access the epoch secrets; `chmod 600` it \
                 (in Kubernetes: defaultMode: 0400 on the Secret volume, 0440 with the pod's fsGroup)",
                meta.gid()
            ));
        }
        Ok((secrets, warnings))
    }

    /// Parses the JSON text of a secrets file; `path` names it in errors.
    fn parse(text: &str, path: &str) -> Result<Self, SecretsError> {
        let form: FileForm = serde_json::from_str(text)
            .map_err(|e| SecretsError::Parse { path: path.to_owned(), reason: e.to_string() })?;
        if form.version != FILE_VERSION {
            return Err(SecretsError::Invalid {
                path: path.to_owned(),
                field: "version".into(),
                reason: format!("{} is not supported; this keyway reads version {FILE_VERSION}", form.version),
            });
        }
        let entries = form
            .epochs
            .into_iter()
            .enumerate()
            .map(|(i, e)| {
                let secret = EpochSecret::from_base64url(&e.secret).map_err(|err| SecretsError::Invalid {
                    path: path.to_owned(),
                    field: format!("epochs[{i}].secret"),
                    reason: err.to_string(),
                })?;
                Ok(EpochEntry { epoch: e.epoch, secret, created_ms: e.created_ms, not_after_ms: e.not_after_ms })
            })
            .collect::<Result<Vec<_>, SecretsError>>()?;
        Self::checked(entries, path)
    }

    /// The file's JSON text (holds the secrets: never log it).
    fn to_file_json(&self) -> String {
        let form = FileForm {
            version: FILE_VERSION,
            epochs: self
                .entries
                .iter()
                .map(|e| EntryForm {
                    epoch: e.epoch,
                    secret: e.secret.to_base64url(),
                    created_ms: e.created_ms,
                    not_after_ms: e.not_after_ms,
                })
                .collect(),
        };
        // Serializing strings and integers cannot fail.
        let mut text = serde_json::to_string_pretty(&form).unwrap_or_default();
        text.push('\n');
        text
    }

    /// Writes the secrets to `path` with mode 0600, atomically (a temporary file in the same
    /// directory, then a rename), replacing any file there.
    pub fn save(&self, path: &Path) -> Result<(), SecretsError> {
        write_file_atomic(path, self.to_file_json().as_bytes(), PRIVATE_FILE_MODE, Replace::Yes)
            .map_err(|source| SecretsError::Write { path: path.display().to_string(), source })
    }

    /// As [`EpochSecrets::save`], but refuses to replace an existing file (atomically: the file
    /// appears complete or not at all, and an existing one is never touched).
    pub fn save_new(&self, path: &Path) -> Result<(), SecretsError> {
        write_file_atomic(path, self.to_file_json().as_bytes(), PRIVATE_FILE_MODE, Replace::No).map_err(|source| {
            if source.kind() == io::ErrorKind::AlreadyExists {
                SecretsError::Exists { path: path.display().to_string() }
            } else {
                SecretsError::Write { path: path.display().to_string(), source }
            }
        })
    }

    /// Starts a new epoch (`max + 1`, a fresh random secret, valid from `now_ms`); every older
    /// epoch stays valid for `overlap_ms` more at most (`not_after_ms = now + overlap`, or its own
    /// earlier `not_after_ms`); epochs already past their `not_after_ms` are dropped. Returns the
    /// new epoch number. Epoch numbers are never reused.
    pub fn rotate(&mut self, now_ms: u64, overlap_ms: u64) -> Result<u32, SecretsError> {
        let max = self.entries.iter().map(|e| e.epoch).max().unwrap_or(0);
        let epoch = max.checked_add(1).ok_or(SecretsError::EpochOverflow { max })?;
        let secret = random_secret()?;
        let until = now_ms.saturating_add(overlap_ms);
        self.entries.retain(|e| e.valid_at(now_ms));
        for e in &mut self.entries {
            e.not_after_ms = Some(e.not_after_ms.map_or(until, |t| t.min(until)));
        }
        self.entries.push(EpochEntry { epoch, secret, created_ms: now_ms, not_after_ms: None });
        Ok(epoch)
    }

    /// The epochs valid at `now_ms`, oldest first.
    pub fn valid_at(&self, now_ms: u64) -> Vec<&EpochEntry> {
        self.entries.iter().filter(|e| e.valid_at(now_ms)).collect()
    }

    /// Epoch `epoch`, if it exists and is valid at `now_ms`.
    pub fn get(&self, epoch: u32, now_ms: u64) -> Option<&EpochEntry> {
        self.entries.iter().find(|e| e.epoch == epoch && e.valid_at(now_ms))
    }

    /// The newest epoch valid at `now_ms`: the one new keys and tickets are sealed with.
    pub fn current(&self, now_ms: u64) -> Option<&EpochEntry> {
        self.entries.iter().rev().find(|e| e.valid_at(now_ms))
    }
}

/// Whose keys a bundle holds: the workload's identity, the overlay address its tokens name, its
/// first overlay address (its ticket key's) and its zone.
#[derive(Debug, Clone, Copy)]
pub struct Holder<'a> {
    /// The workload's SPIFFE identity.
    pub identity: &'a str,
    /// The overlay address its tokens name (the one it asked for keys with).
    pub overlay_ip: IpAddr,
    /// Its first overlay address: the address its ticket key is derived for.
    pub key_ip: IpAddr,
    /// Its zone.
    pub zone: &'a str,
}

/// The keys of one workload at `now_ms`: for every epoch valid then, its workload key (for the
/// holder's identity at its overlay address) and its own ticket key, oldest first, each with
/// the epoch's `not_after_ms`. The gateway's key service and `keyway keys issue` both answer with it.
pub fn key_bundle(
    secrets: &EpochSecrets,
    now_ms: u64,
    holder: Holder<'_>,
    refresh_ms: u64,
) -> Result<KeyBundle, SecretsError> {
    key_bundle_activating(secrets, now_ms, holder, refresh_ms, 0)
}

/// As [`key_bundle`], with every epoch but the oldest valid one activated `activation_ms` after
/// it was created (`not_before_ms`): filters learn a new epoch at once but seal with it only once
/// every gateway has had time to load it.
pub fn key_bundle_activating(
    secrets: &EpochSecrets,
    now_ms: u64,
    holder: Holder<'_>,
    refresh_ms: u64,
    activation_ms: u64,
) -> Result<KeyBundle, SecretsError> {
    let Holder { identity, overlay_ip, key_ip, zone } = holder;
    let valid = secrets.valid_at(now_ms);
    let oldest = valid.first().map(|e| e.epoch);
    if valid.is_empty() {
        return Err(SecretsError::NoValidEpoch { now_ms });
    }
    let mut workload_keys = Vec::with_capacity(valid.len());
    let mut ticket_keys = Vec::with_capacity(valid.len());
    for e in valid {
        let wk = e.secret.workload_key(identity, overlay_ip, e.epoch)?;
        let tk = e.secret.ticket_key(identity, key_ip, e.epoch)?;
        let not_before_ms = if Some(e.epoch) == oldest || activation_ms == 0 {
            None
        } else {
            Some(e.created_ms.saturating_add(activation_ms))
        };
        workload_keys.push(EpochKey {
            epoch: e.epoch,
            key: wk.to_base64url(),
            not_after_ms: e.not_after_ms,
            not_before_ms,
        });
        ticket_keys.push(EpochKey {
            epoch: e.epoch,
            key: tk.to_base64url(),
            not_after_ms: e.not_after_ms,
            not_before_ms,
        });
    }
    Ok(KeyBundle {
        identity: identity.to_owned(),
        overlay_ip,
        zone: zone.to_owned(),
        workload_keys,
        ticket_keys,
        refresh_ms,
    })
}

impl EpochSecrets {
    /// The epoch to seal with at `now_ms`: the newest valid epoch activated at least
    /// `activation_ms` after its creation, else the oldest valid one (the same rule the key
    /// service gives filters through `not_before_ms`).
    pub fn sealing(&self, now_ms: u64, activation_ms: u64) -> Option<&EpochEntry> {
        let valid = self.valid_at(now_ms);
        let oldest = valid.first().copied();
        valid.into_iter().rev().find(|e| e.created_ms.saturating_add(activation_ms) <= now_ms).or(oldest)
    }
}

fn random_secret() -> Result<EpochSecret, SecretsError> {
    let mut bytes = [0u8; KEY_LEN];
    getrandom::fill(&mut bytes).map_err(|e| SecretsError::Random(e.to_string()))?;
    Ok(EpochSecret::from_bytes(bytes))
}

/// Whether [`write_file_atomic`] may replace an existing file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Replace {
    /// Replace it (rename over it).
    Yes,
    /// Fail with `AlreadyExists` and leave it untouched (hard link, which never replaces).
    No,
}

/// Writes `bytes` to `path` atomically: a new temporary file in the same directory, created with
/// `mode`, written and synced, then renamed over `path` (or hard-linked to it when `replace` is
/// `No`), and the directory synced. Readers see the old file or the new one, never a part.
pub(crate) fn write_file_atomic(path: &Path, bytes: &[u8], mode: u32, replace: Replace) -> io::Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name =
        path.file_name().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the path does not name a file"))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{}",
        name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let written = (|| {
        let mut f = OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
        // The umask may have removed bits, never added any; set the mode exactly.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        match replace {
            Replace::Yes => fs::rename(&tmp, path),
            Replace::No => fs::hard_link(&tmp, path).and_then(|()| fs::remove_file(&tmp)),
        }
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written?;
    // Make the rename durable; a directory that cannot be opened or synced is not an error.
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyway_policy::auth::{TicketKey, WorkloadKey};
    use std::path::PathBuf;

    const ID: &str = "spiffe://cluster.local/ns/shop/sa/cart";

    fn tmpdir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("keyway-secrets-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn entry(epoch: u32, byte: u8, not_after_ms: Option<u64>) -> EpochEntry {
        EpochEntry { epoch, secret: EpochSecret::from_bytes([byte; 32]), created_ms: 5, not_after_ms }
    }

    #[test]
    fn generate_gives_epoch_one_with_fresh_randomness() {
        let a = EpochSecrets::generate(1000).unwrap();
        let b = EpochSecrets::generate(1000).unwrap();
        assert_eq!(a.entries().len(), 1);
        let e = &a.entries()[0];
        assert_eq!((e.epoch, e.created_ms, e.not_after_ms), (1, 1000, None));
        assert_ne!(a.entries()[0].secret, b.entries()[0].secret);
        assert_ne!(e.secret, EpochSecret::from_bytes([0; 32]));
    }

    #[test]
    fn debug_never_shows_a_secret() {
        let s = EpochSecrets::generate(1).unwrap();
        let debug = format!("{s:?} {:?}", s.entries()[0]);
        assert!(debug.contains("[redacted]"), "{debug}");
        assert!(!debug.contains(&s.entries()[0].secret.to_base64url()), "{debug}");
    }

    #[test]
    fn save_load_round_trip_with_mode_0600() {
        let dir = tmpdir("roundtrip");
        let path = dir.join("secrets.json");
        let mut s = EpochSecrets::generate(10).unwrap();
        s.rotate(20, 100).unwrap();
        s.save(&path).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let (loaded, warnings) = EpochSecrets::load_with_warnings(&path).unwrap();
        assert_eq!(loaded, s);
        assert!(warnings.is_empty(), "{warnings:?}");
        let v: serde_json::Value = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(v["version"], 1);
        assert_eq!(v["epochs"][0]["not_after_ms"], 120);
        assert_eq!(v["epochs"][1]["not_after_ms"], serde_json::Value::Null);
        assert_eq!(v["epochs"][1]["secret"].as_str().unwrap().len(), 43);
        // No temporary files are left behind.
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
    }

    #[test]
    fn save_new_refuses_an_existing_file_and_leaves_it_alone() {
        let dir = tmpdir("savenew");
        let path = dir.join("s.json");
        fs::write(&path, "keep").unwrap();
        let err = EpochSecrets::generate(1).unwrap().save_new(&path).unwrap_err();
        assert!(matches!(err, SecretsError::Exists { .. }), "{err}");
        assert!(err.to_string().contains("--force"), "{err}");
        assert_eq!(fs::read_to_string(&path).unwrap(), "keep");
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
    }

    #[test]
    fn group_read_by_an_own_group_is_fine_anything_looser_warns() {
        let own = [1000, 2000];
        assert!(!loose_mode(0o100600, 1000, &own));
        assert!(!loose_mode(0o100400, 5, &own), "no group bits: any group");
        assert!(!loose_mode(0o100440, 2000, &own), "fsGroup's 0440, the gateway in that group");
        assert!(loose_mode(0o100440, 3000, &own), "another group may read");
        assert!(loose_mode(0o100460, 2000, &own), "group write");
        assert!(loose_mode(0o100444, 2000, &own), "others may read");
        assert!(loose_mode(0o100640, 2000, &[]), "groups unknown");
        assert!(own_groups().contains(&fs::metadata("/proc/self/status").map(|m| m.gid()).unwrap_or(u32::MAX)));
    }

    #[test]
    fn loose_mode_is_a_warning() {
        let dir = tmpdir("mode");
        let path = dir.join("s.json");
        EpochSecrets::generate(1).unwrap().save(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let (_, warnings) = EpochSecrets::load_with_warnings(&path).unwrap();
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("mode 0644") && warnings[0].contains("chmod 600"), "{warnings:?}");
    }

    #[test]
    fn load_errors_name_the_file_and_the_field() {
        let dir = tmpdir("errors");
        let good = EpochSecret::from_bytes([1; 32]).to_base64url();
        let cases = [
            ("{", "not an epoch secrets file"),
            (r#"{"version":2,"epochs":[]}"#, "version: 2 is not supported"),
            (r#"{"version":1,"epochs":[]}"#, "epochs: empty"),
            (
                r#"{"version":1,"epochs":[{"epoch":1,"secret":"short","created_ms":0}]}"#,
                "epochs[0].secret: epoch secret",
            ),
            (r#"{"version":1,"epochs":[{"epoch":1,"created_ms":0}]}"#, "missing field `secret`"),
            (r#"{"version":1,"epochs":[{"epoch":1,"secret":"x","created_ms":0,"extra":1}]}"#, "unknown field `extra`"),
        ];
        for (i, (text, want)) in cases.iter().enumerate() {
            let path = dir.join(format!("{i}.json"));
            fs::write(&path, text).unwrap();
            let err = EpochSecrets::load(&path).unwrap_err().to_string();
            assert!(err.starts_with(&path.display().to_string()), "{err}");
            assert!(err.contains(want), "{text}: {err}");
        }
        let dup = format!(
            r#"{{"version":1,"epochs":[{{"epoch":3,"secret":"{good}","created_ms":0}},{{"epoch":3,"secret":"{good}","created_ms":0}}]}}"#
        );
        let path = dir.join("dup.json");
        fs::write(&path, dup).unwrap();
        assert!(EpochSecrets::load(&path).unwrap_err().to_string().contains("epochs[1].epoch: epoch 3 appears twice"));
        let zero = format!(r#"{{"version":1,"epochs":[{{"epoch":0,"secret":"{good}","created_ms":0}}]}}"#);
        fs::write(&path, zero).unwrap();
        assert!(EpochSecrets::load(&path).unwrap_err().to_string().contains("epochs[0].epoch: 0 is not an epoch"));
        let missing = dir.join("absent.json");
        assert!(EpochSecrets::load(&missing).unwrap_err().to_string().contains("absent.json: cannot read"));
    }

    #[test]
    fn rotate_overlaps_then_drops() {
        let mut s = EpochSecrets::generate(0).unwrap();
        assert_eq!(s.rotate(1_000, 500).unwrap(), 2);
        // During the overlap both are valid; the new one is current.
        assert_eq!(s.valid_at(1_500).iter().map(|e| e.epoch).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(s.current(1_500).unwrap().epoch, 2);
        assert_eq!(s.get(1, 1_500).unwrap().not_after_ms, Some(1_500));
        // After it, only the new one.
        assert_eq!(s.valid_at(1_501).iter().map(|e| e.epoch).collect::<Vec<_>>(), [2]);
        assert!(s.get(1, 1_501).is_none());
        assert!(s.get(7, 0).is_none());
        // A rotation inside the overlap keeps epoch 1 (still valid) with its earlier end.
        assert_eq!(s.rotate(1_200, 10_000).unwrap(), 3);
        let ends: Vec<_> = s.entries().iter().map(|e| (e.epoch, e.not_after_ms)).collect();
        assert_eq!(ends, [(1, Some(1_500)), (2, Some(11_200)), (3, None)]);
        // A later rotation drops every epoch already past its end.
        assert_eq!(s.rotate(20_000, 0).unwrap(), 4);
        let ends: Vec<_> = s.entries().iter().map(|e| (e.epoch, e.not_after_ms)).collect();
        assert_eq!(ends, [(3, Some(20_000)), (4, None)]);
        assert_ne!(s.entries()[0].secret, s.entries()[1].secret);
    }

    #[test]
    fn epoch_numbers_are_never_reused_even_when_everything_expired() {
        let mut s = EpochSecrets::from_entries(vec![entry(7, 1, Some(10)), entry(5, 2, Some(10))]).unwrap();
        assert_eq!(s.entries()[0].epoch, 5);
        assert!(s.current(11).is_none());
        assert_eq!(s.rotate(11, 0).unwrap(), 8);
        assert_eq!(s.entries().iter().map(|e| e.epoch).collect::<Vec<_>>(), [8]);
        let mut last = EpochSecrets::from_entries(vec![entry(u32::MAX, 1, None)]).unwrap();
        assert!(matches!(last.rotate(0, 0), Err(SecretsError::EpochOverflow { max: u32::MAX })));
    }

    #[test]
    fn key_bundle_derives_every_valid_epoch() {
        let s = EpochSecrets::from_entries(vec![entry(1, 1, Some(100)), entry(2, 2, Some(2_000)), entry(3, 3, None)])
            .unwrap();
        let ip: IpAddr = "10.128.1.11".parse().unwrap();
        let b =
            key_bundle(&s, 1_000, Holder { identity: ID, overlay_ip: ip, key_ip: ip, zone: "zone-a" }, 5_000).unwrap();
        assert_eq!((b.identity.as_str(), b.overlay_ip, b.zone.as_str(), b.refresh_ms), (ID, ip, "zone-a", 5_000));
        assert_eq!(
            b.workload_keys.iter().map(|k| (k.epoch, k.not_after_ms)).collect::<Vec<_>>(),
            [(2, Some(2_000)), (3, None)]
        );
        assert_eq!(b.ticket_keys.iter().map(|k| k.epoch).collect::<Vec<_>>(), [2, 3]);
        let secret3 = EpochSecret::from_bytes([3; 32]);
        assert_eq!(
            WorkloadKey::from_base64url(&b.workload_keys[1].key).unwrap(),
            secret3.workload_key(ID, ip, 3).unwrap()
        );
        assert_eq!(TicketKey::from_base64url(&b.ticket_keys[1].key).unwrap(), secret3.ticket_key(ID, ip, 3).unwrap());
        assert_eq!(b.signing_key(1_000).unwrap().0, 3);
        b.validate().unwrap();

        let expired = EpochSecrets::from_entries(vec![entry(1, 1, Some(100))]).unwrap();
        assert!(matches!(
            key_bundle(&expired, 101, Holder { identity: ID, overlay_ip: ip, key_ip: ip, zone: "z" }, 1),
            Err(SecretsError::NoValidEpoch { now_ms: 101 })
        ));
        let long = "x".repeat(2_000);
        assert!(matches!(
            key_bundle(&s, 0, Holder { identity: &long, overlay_ip: ip, key_ip: ip, zone: "z" }, 1),
            Err(SecretsError::Derive(_))
        ));
    }

    #[test]
    fn atomic_write_replaces_or_refuses() {
        let dir = tmpdir("atomic");
        let path = dir.join("f");
        write_file_atomic(&path, b"one", 0o644, Replace::No).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o644);
        let err = write_file_atomic(&path, b"two", 0o600, Replace::No).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&path).unwrap(), b"one");
        write_file_atomic(&path, b"three", 0o600, Replace::Yes).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"three");
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
        assert!(write_file_atomic(&dir.join("missing/f"), b"x", 0o600, Replace::Yes).is_err());
    }
}
