//! `keyway agent` on the command line, without root: the help teaches with an example and
//! `--check` validates the configuration and the TLS files without touching the host. (The agent
//! itself, with its TUN device and iptables, runs in the e2e suite's network namespaces.)

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::SystemTime;

use keyway_gateway::ca::Ca;

fn keyway(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_keyway")).args(args).output().expect("run keyway")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn tmpdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("keyway-agent-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A CA in `dir` and a device certificate of `issuer` (the same CA, or another).
fn files(dir: &Path, foreign: bool) {
    let now = SystemTime::now();
    let ca = Ca::generate("cluster.local", 2, now).unwrap();
    let other = Ca::generate("cluster.local", 2, now).unwrap();
    let issuer = if foreign { &other } else { &ca };
    let (cert, key) = issuer.issue_workload("field", "laptop-7", 1, now).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.cert_pem()).unwrap();
    std::fs::write(dir.join("laptop.pem"), cert).unwrap();
    std::fs::write(dir.join("laptop-key.pem"), key).unwrap();
}

fn config(dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("agent.yaml");
    let d = dir.display();
    std::fs::write(
        &path,
        format!(
            "zone: zone-a\noverlay_ip: 10.128.9.1\noverlay_cidrs: [10.128.0.0/16]\ngateways: [\"192.0.2.10:15444\"]\n\
             tls: {{ca: {d}/ca.pem, cert: {d}/laptop.pem, key: {d}/laptop-key.pem}}\n{extra}"
        ),
    )
    .unwrap();
    path
}

#[test]
fn help_teaches_with_an_example() {
    let out = keyway(&["agent", "--help"]);
    assert!(out.status.success());
    let help = text(&out.stdout);
    for want in ["Example: keyway agent --config agent.yaml", "overlay_cidrs: [10.128.0.0/16]", "--check"] {
        assert!(help.contains(want), "{want}: {help}");
    }
}

#[test]
fn check_prints_the_effective_configuration_or_names_what_is_wrong() {
    let dir = tmpdir("check");
    files(&dir, false);
    let path = config(&dir, "mode: pod\n");
    let out = keyway(&["agent", "--config", path.to_str().unwrap(), "--check"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["mode"], "pod");
    assert_eq!(json["tun"]["name"], "kw0");
    assert_eq!(json["tcp_listen"], "127.0.0.1:15006");

    let path = config(&dir, "tun: {mtu: 100}\n");
    let out = keyway(&["agent", "--config", path.to_str().unwrap(), "--check"]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("agent.yaml: field `tun.mtu`: 100 is below the minimum 576"), "{err}");

    // A device certificate of another CA: refused before any gateway sees it.
    let other = tmpdir("check-foreign");
    files(&other, true);
    let path = config(&other, "");
    let out = keyway(&["agent", "--config", path.to_str().unwrap(), "--check"]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("laptop.pem: does not verify against the CA in"), "{err}");
}
