//! `keyway keys …`: epoch secrets (create, rotate) and the static keys of one workload.
//!
//! Nothing here prints a secret: `init` and `rotate` print the epoch number only; `issue` prints
//! derived keys (the filter's static configuration), never the epoch secrets.

use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use keyway_policy::inventory::{OVERLAY_IPS_ANNOTATION, Workload, ZONE_ANNOTATION};
use keyway_policy::keyservice::DEFAULT_REFRESH_MS;

use crate::ca::DEFAULT_TRUST_DOMAIN;
use crate::secrets::{self, EpochSecrets};

/// Exit code for bad input or a failed operation.
const EXIT_FAILURE: u8 = 2;

/// `keyway keys` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum KeysCommand {
    /// Create the epoch secrets file (epoch 1, mode 0600); prints the epoch number.
    ///
    /// Epoch 1 gets 32 random bytes from the operating system. The file is what every gateway of
    /// the overlay shares (workload keys and ticket keys derive from it); keep it secret and give
    /// it only to gateways. An existing file is never replaced unless --force is given: replacing
    /// it invalidates every key derived from it at once.
    ///
    /// Example: keyway keys init --out ./secrets.json
    Init {
        /// The file to create.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Replace an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Start a new key epoch; prints only its number.
    ///
    /// The previous epoch stays valid for the overlap; epochs whose overlap has passed are dropped.
    /// The overlap must exceed the filters' key refresh interval (10 s by default) plus the token
    /// window (30 s) plus the time to deliver the file to every gateway. The file is replaced
    /// atomically with mode 0600.
    ///
    /// Example: keyway keys rotate --out ./secrets.json --overlap 30m
    Rotate {
        /// The secrets file to rotate in place.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// How long the previous epoch stays valid: a number with ms, s, m, h or d.
        #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = parse_duration_ms)]
        overlap: u64,
    },
    /// Print one workload's keys as JSON: the keyway filter's static key block.
    ///
    /// The JSON holds its workload keys and its zone's ticket keys for every valid epoch, never an
    /// epoch secret. The workload's identity is
    /// spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>; its zone and overlay address
    /// come from its keyway.io/zone and keyway.io/overlay-ips annotations unless given. A static
    /// block does not follow rotations: reissue it after each one, or let the filter fetch keys
    /// from its gateway's key service.
    ///
    /// Example: keyway keys issue --secrets ./secrets.json --workload shop/cart --inventory samples/shop
    Issue {
        /// The epoch secrets file.
        #[arg(long, value_name = "FILE")]
        secrets: PathBuf,
        /// The workload: NAMESPACE/NAME or NAMESPACE/NAME[Kind].
        #[arg(long, value_name = "NS/NAME")]
        workload: String,
        /// The directory of manifests holding the workload (as `keyway policy`).
        #[arg(long, value_name = "DIR")]
        inventory: PathBuf,
        /// The SPIFFE trust domain of the mesh.
        #[arg(long, value_name = "DOMAIN", default_value = DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// The workload's zone (default: its keyway.io/zone annotation).
        #[arg(long, value_name = "ZONE")]
        zone: Option<String>,
        /// The overlay address to derive the key for (default: the workload's first overlay
        /// address).
        #[arg(long, value_name = "IP")]
        ip: Option<IpAddr>,
    },
}

/// Runs the command: the result on stdout; warnings and an error (one line, exit code 2) on stderr.
pub fn run(cmd: KeysCommand) -> ExitCode {
    match execute(cmd) {
        Ok(out) => {
            // A closed pipe is not worth reporting.
            let _ = std::io::stdout().lock().write_all(out.as_bytes());
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("keyway: {message}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn load_secrets(path: &Path) -> Result<EpochSecrets, String> {
    let (secrets, warnings) = EpochSecrets::load_with_warnings(path).map_err(|e| e.to_string())?;
    for w in warnings {
        eprintln!("keyway: warning: {w}");
    }
    Ok(secrets)
}

fn execute(cmd: KeysCommand) -> Result<String, String> {
    match cmd {
        KeysCommand::Init { out, force } => {
            let secrets = EpochSecrets::generate(now_ms()).map_err(|e| e.to_string())?;
            if force { secrets.save(&out) } else { secrets.save_new(&out) }.map_err(|e| e.to_string())?;
            Ok("1\n".to_owned())
        }
        KeysCommand::Rotate { out, overlap } => {
            let mut secrets = load_secrets(&out)?;
            let epoch = secrets.rotate(now_ms(), overlap).map_err(|e| e.to_string())?;
            secrets.save(&out).map_err(|e| e.to_string())?;
            Ok(format!("{epoch}\n"))
        }
        KeysCommand::Issue { secrets, workload, inventory, trust_domain, zone, ip } => {
            let epoch_secrets = load_secrets(&secrets)?;
            let (engine, warnings) = keyway_policy::fs::load_dir(&inventory).map_err(|e| e.to_string())?;
            for w in warnings {
                eprintln!("{w}");
            }
            let w = find_workload(&engine.inventory().workloads, &workload)?;
            let zone = workload_zone(w, zone)?;
            let ip = workload_ip(w, ip)?;
            let identity = w.identity(&trust_domain);
            let key_ip = w.overlay_ips.first().copied().unwrap_or(ip);
            let holder = secrets::Holder { identity: &identity, overlay_ip: ip, key_ip, zone: &zone };
            let bundle = secrets::key_bundle(&epoch_secrets, now_ms(), holder, DEFAULT_REFRESH_MS)
                .map_err(|e| format!("{}: {e}", secrets.display()))?;
            let mut text = serde_json::to_string_pretty(&bundle).map_err(|e| e.to_string())?;
            text.push('\n');
            Ok(text)
        }
    }
}

/// The zone: `--zone`, else the annotation; both given and different is an error.
fn workload_zone(w: &Workload, flag: Option<String>) -> Result<String, String> {
    match (flag, &w.zone) {
        (Some(given), Some(annotated)) if given != *annotated => Err(format!(
            "--zone {given}: {} is in zone {annotated:?} ({ZONE_ANNOTATION}); leave --zone out or fix the annotation",
            w.display_name()
        )),
        (Some(given), _) => Ok(given),
        (None, Some(annotated)) => Ok(annotated.clone()),
        (None, None) => Err(format!(
            "{} has no zone: add the annotation {ZONE_ANNOTATION}: <zone> to its pod template in {} (or pass --zone)",
            w.display_name(),
            w.file
        )),
    }
}

/// The overlay address: `--ip` (one of the workload's), else its first.
fn workload_ip(w: &Workload, flag: Option<IpAddr>) -> Result<IpAddr, String> {
    match flag {
        Some(ip) if w.overlay_ips.contains(&ip) => Ok(ip),
        Some(ip) => Err(format!(
            "--ip {ip} is not an overlay address of {} (its {OVERLAY_IPS_ANNOTATION}: {}); a gateway verifies tokens \
             only for addresses in its inventory",
            w.display_name(),
            if w.overlay_ips.is_empty() {
                "none".to_owned()
            } else {
                w.overlay_ips.iter().map(IpAddr::to_string).collect::<Vec<_>>().join(",")
            }
        )),
        None => w.overlay_ips.first().copied().ok_or_else(|| {
            format!(
                "{} has no overlay address: add the annotation {OVERLAY_IPS_ANNOTATION}: \"<ip>\" to its pod template in {}",
                w.display_name(),
                w.file
            )
        }),
    }
}

/// The workload `NS/NAME` or `NS/NAME[Kind]`.
fn find_workload<'a>(workloads: &'a [Workload], s: &str) -> Result<&'a Workload, String> {
    let (name, kind) = match s.strip_suffix(']').and_then(|x| x.split_once('[')) {
        Some((n, k)) => (n, Some(k)),
        None => (s, None),
    };
    let Some((ns, name)) = name.split_once('/') else {
        return Err(format!("--workload {s}: expected NAMESPACE/NAME or NAMESPACE/NAME[Kind]"));
    };
    let found: Vec<&Workload> =
        workloads.iter().filter(|w| w.namespace == ns && w.name == name && kind.is_none_or(|k| w.kind == k)).collect();
    match found.as_slice() {
        [w] => Ok(w),
        [] => {
            let known: Vec<String> =
                workloads.iter().filter(|w| w.namespace == ns).map(Workload::display_name).take(10).collect();
            let hint = if known.is_empty() {
                format!("namespace {ns:?} has no workloads")
            } else {
                format!("workloads in {ns}: {}", known.join(", "))
            };
            Err(format!("--workload {s}: no such workload ({hint})"))
        }
        many => {
            let names: Vec<String> = many.iter().map(|w| w.display_name()).collect();
            Err(format!("--workload {s}: ambiguous, name the kind: {}", names.join(" or ")))
        }
    }
}

/// `500ms`, `30s`, `10m`, `2h`, `1d` as milliseconds.
fn parse_duration_ms(s: &str) -> Result<u64, String> {
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    let (num, unit) = s.split_at(digits);
    let factor: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("{s:?}: expected a number with a unit ms, s, m, h or d (10m, 90s)")),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(factor))
        .ok_or_else(|| format!("{s:?}: expected a number with a unit ms, s, m, h or d (10m, 90s)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("10m"), Ok(600_000));
        assert_eq!(parse_duration_ms("0s"), Ok(0));
        assert_eq!(parse_duration_ms("250ms"), Ok(250));
        assert_eq!(parse_duration_ms("2h"), Ok(7_200_000));
        assert_eq!(parse_duration_ms("1d"), Ok(86_400_000));
        for bad in ["", "10", "m", "-1m", "1.5h", "10 m", "10M", "99999999999999999999d"] {
            assert!(parse_duration_ms(bad).is_err(), "{bad}");
        }
    }
}
