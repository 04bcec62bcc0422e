#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test harness
//! `keyway ca` and `keyway keys` as a user runs them (real process, real files, modes, exit codes),
//! and the QUIC overlay's mutual TLS with certificates made by them.

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keyway_gateway::tls::{self, GatewayIdentity, TlsMaterial};
use keyway_policy::auth::{EpochSecret, TicketKey, WorkloadKey};
use keyway_policy::keyservice::KeyBundle;

fn keyway(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_keyway")).args(args).output().expect("run keyway")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn tmpdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("keyway-ca-keys-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// Succeeds, or fails the test with the command's stderr.
fn ok(args: &[&str]) -> String {
    let out = keyway(args);
    assert!(out.status.success(), "keyway {args:?}: {}", text(&out.stderr));
    text(&out.stdout)
}

/// Fails with exit code 2 and one line on stderr; returns the line.
fn fails(args: &[&str]) -> String {
    let out = keyway(args);
    assert_eq!(out.status.code(), Some(2), "keyway {args:?}: {}", text(&out.stdout));
    let err = text(&out.stderr);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("keyway: "), "{err}");
    err
}

/// The epoch secrets file as (epoch, secret, not_after_ms).
fn read_secrets(path: &Path) -> Vec<(u32, EpochSecret, Option<u64>)> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(v["version"], 1);
    v["epochs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["epoch"].as_u64().unwrap() as u32,
                EpochSecret::from_base64url(e["secret"].as_str().unwrap()).unwrap(),
                e["not_after_ms"].as_u64(),
            )
        })
        .collect()
}

#[test]
fn ca_init_writes_a_private_key_and_refuses_to_replace_it() {
    let dir = tmpdir("ca-init");
    let ca = dir.join("ca");
    let out = ok(&["ca", "init", "--out", s(&ca), "--trust-domain", "example.org"]);
    assert!(out.contains("trust domain example.org"), "{out}");
    assert_eq!(mode(&ca.join("ca-key.pem")), 0o600);
    assert!(std::fs::read_to_string(ca.join("ca.pem")).unwrap().starts_with("-----BEGIN CERTIFICATE-----"));
    let key = std::fs::read(ca.join("ca-key.pem")).unwrap();

    let err = fails(&["ca", "init", "--out", s(&ca)]);
    assert!(err.contains("already exists") && err.contains("--force"), "{err}");
    assert_eq!(std::fs::read(ca.join("ca-key.pem")).unwrap(), key, "the existing key is untouched");

    ok(&["ca", "init", "--out", s(&ca), "--force"]);
    assert_ne!(std::fs::read(ca.join("ca-key.pem")).unwrap(), key);
    assert_eq!(mode(&ca.join("ca-key.pem")), 0o600);
    let mut names: Vec<String> =
        std::fs::read_dir(&ca).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, ["ca-key.pem", "ca.pem"], "no temporary files are left");

    let err = fails(&["ca", "init", "--out", s(&dir.join("bad")), "--trust-domain", "Not A Domain"]);
    assert!(err.contains("trust domain"), "{err}");
}

#[test]
fn ca_issue_writes_gateway_files_with_the_cas_trust_domain() {
    let dir = tmpdir("ca-issue");
    let (ca, certs) = (dir.join("ca"), dir.join("certs"));
    ok(&["ca", "init", "--out", s(&ca), "--trust-domain", "mesh.example"]);
    let out = ok(&["ca", "issue", "--ca", s(&ca), "--zone", "zone-a", "--name", "gw-1", "--out", s(&certs)]);
    assert!(out.contains("spiffe://mesh.example/zone/zone-a/gateway/gw-1"), "{out}");
    assert!(out.contains("gw-1.zone-a.gateway.keyway"), "{out}");
    let (cert, key) = (certs.join("zone-a-gw-1.pem"), certs.join("zone-a-gw-1-key.pem"));
    assert_eq!(mode(&key), 0o600);
    let m = TlsMaterial::load(&ca.join("ca.pem"), &cert, &key).unwrap();
    assert_eq!(m.identity().unwrap(), GatewayIdentity::new("mesh.example", "zone-a", "gw-1").unwrap());

    // Issuing again renews: new files, still valid.
    let before = std::fs::read(&key).unwrap();
    ok(&["ca", "issue", "--ca", s(&ca), "--zone", "zone-a", "--name", "gw-1", "--out", s(&certs), "--days", "30"]);
    assert_ne!(std::fs::read(&key).unwrap(), before);
    TlsMaterial::load(&ca.join("ca.pem"), &cert, &key).unwrap();

    let err = fails(&["ca", "issue", "--ca", s(&ca), "--zone", "Zone_A", "--name", "gw-1", "--out", s(&certs)]);
    assert!(err.contains("DNS label"), "{err}");
    let err = fails(&["ca", "issue", "--ca", s(&ca), "--zone", "z", "--name", "g", "--out", s(&certs), "--days", "0"]);
    assert!(err.contains("1 to 36500 days"), "{err}");
    let err =
        fails(&["ca", "issue", "--ca", s(&ca), "--zone", "z", "--name", "g", "--out", s(&certs), "--days", "4000"]);
    assert!(err.contains("outlive the CA"), "{err}");
    let err = fails(&["ca", "issue", "--ca", s(&dir.join("nope")), "--zone", "z", "--name", "g", "--out", s(&certs)]);
    assert!(err.contains("nope/ca.pem: cannot read"), "{err}");
}

#[test]
fn keys_init_is_private_and_refuses_to_replace() {
    let dir = tmpdir("keys-init");
    let file = dir.join("secrets.json");
    assert_eq!(ok(&["keys", "init", "--out", s(&file)]), "1\n");
    assert_eq!(mode(&file), 0o600);
    let first = read_secrets(&file);
    assert_eq!(first.len(), 1);
    assert_eq!((first[0].0, first[0].2), (1, None));

    let err = fails(&["keys", "init", "--out", s(&file)]);
    assert!(err.contains("already exists") && err.contains("--force"), "{err}");
    assert_eq!(read_secrets(&file)[0].1, first[0].1, "the existing secrets are untouched");

    assert_eq!(ok(&["keys", "init", "--out", s(&file), "--force"]), "1\n");
    assert_ne!(read_secrets(&file)[0].1, first[0].1);
    assert_eq!(mode(&file), 0o600);
}

#[test]
fn keys_rotate_keeps_the_overlap_drops_the_expired_and_prints_no_secret() {
    let dir = tmpdir("keys-rotate");
    let file = dir.join("secrets.json");
    ok(&["keys", "init", "--out", s(&file)]);

    let before = now_ms();
    let out = ok(&["keys", "rotate", "--out", s(&file), "--overlap", "10m"]);
    let after = now_ms();
    assert_eq!(out, "2\n", "only the new epoch number");
    assert_eq!(mode(&file), 0o600);
    let epochs = read_secrets(&file);
    assert_eq!(epochs.iter().map(|e| e.0).collect::<Vec<_>>(), [1, 2]);
    let end = epochs[0].2.unwrap();
    assert!((before + 600_000..=after + 600_000).contains(&end), "{before} {end} {after}");
    assert_eq!(epochs[1].2, None);
    for (_, secret, _) in &epochs {
        assert!(!out.contains(&secret.to_base64url()));
    }

    // Epoch 1's overlap has passed: the next rotation drops it and ends epoch 2 after the overlap.
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    v["epochs"][0]["not_after_ms"] = serde_json::json!(1_000);
    std::fs::write(&file, serde_json::to_string(&v).unwrap()).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let before = now_ms();
    let rotated = keyway(&["keys", "rotate", "--out", s(&file), "--overlap", "90s"]);
    assert!(rotated.status.success());
    assert_eq!(text(&rotated.stdout), "3\n");
    assert_eq!(text(&rotated.stderr), "", "no warning for a 0600 file");
    let epochs = read_secrets(&file);
    assert_eq!(epochs.iter().map(|e| e.0).collect::<Vec<_>>(), [2, 3]);
    assert!(epochs[0].2.unwrap() >= before + 90_000);
    assert_eq!(epochs[1].2, None);

    // A file others may read is rotated with a warning on stderr.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let loose = keyway(&["keys", "rotate", "--out", s(&file)]);
    assert!(loose.status.success());
    assert_eq!(text(&loose.stdout), "4\n");
    assert!(text(&loose.stderr).contains("mode 0644"), "{}", text(&loose.stderr));
    assert_eq!(mode(&file), 0o600, "rewritten private");

    let err = fails(&["keys", "rotate", "--out", s(&dir.join("absent.json"))]);
    assert!(err.contains("absent.json: cannot read"), "{err}");
    std::fs::write(dir.join("bad.json"), "{\"version\":1}").unwrap();
    let err = fails(&["keys", "rotate", "--out", s(&dir.join("bad.json"))]);
    assert!(err.contains("bad.json") && err.contains("missing field `epochs`"), "{err}");
    let out = keyway(&["keys", "rotate", "--out", s(&file), "--overlap", "ten minutes"]);
    assert_eq!(out.status.code(), Some(2));
}

const INVENTORY: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: cart, namespace: shop}
spec:
  template:
    metadata:
      labels: {app: cart}
      annotations: {keyway.io/zone: zone-a, keyway.io/overlay-ips: "10.128.1.11,fd00::11"}
    spec:
      serviceAccountName: cart-sa
      containers: [{name: c, image: x}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: nozone, namespace: shop}
spec:
  template:
    metadata:
      labels: {app: nozone}
      annotations: {keyway.io/overlay-ips: "10.128.1.12"}
    spec: {containers: [{name: c, image: x}]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: noip, namespace: shop}
spec:
  template:
    metadata:
      labels: {app: noip}
      annotations: {keyway.io/zone: zone-b}
    spec: {containers: [{name: c, image: x}]}
"#;

#[test]
fn keys_issue_prints_the_bundle_a_filter_needs() {
    let dir = tmpdir("keys-issue");
    let (file, inv) = (dir.join("secrets.json"), dir.join("inventory"));
    std::fs::create_dir_all(&inv).unwrap();
    std::fs::write(inv.join("workloads.yaml"), INVENTORY).unwrap();
    ok(&["keys", "init", "--out", s(&file)]);
    ok(&["keys", "rotate", "--out", s(&file)]);
    let secrets = read_secrets(&file);

    let issue = |extra: &[&str]| {
        let mut args = vec!["keys", "issue", "--secrets", s(&file), "--inventory", s(&inv)];
        args.extend_from_slice(extra);
        args.iter().map(|a| (*a).to_owned()).collect::<Vec<String>>()
    };
    let args = issue(&["--workload", "shop/cart"]);
    let out = ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let bundle: KeyBundle = serde_json::from_str(&out).unwrap();
    let ip: IpAddr = "10.128.1.11".parse().unwrap();
    let identity = "spiffe://cluster.local/ns/shop/sa/cart-sa";
    assert_eq!((bundle.identity.as_str(), bundle.overlay_ip, bundle.zone.as_str()), (identity, ip, "zone-a"));
    assert_eq!(bundle.workload_keys.len(), 2, "both epochs of the overlap");
    for (i, (epoch, secret, not_after)) in secrets.iter().enumerate() {
        let wk = &bundle.workload_keys[i];
        assert_eq!((wk.epoch, wk.not_after_ms), (*epoch, *not_after));
        assert_eq!(WorkloadKey::from_base64url(&wk.key).unwrap(), secret.workload_key(identity, ip, *epoch).unwrap());
        let tk = &bundle.ticket_keys[i];
        assert_eq!((tk.epoch, tk.not_after_ms), (*epoch, *not_after));
        assert_eq!(TicketKey::from_base64url(&tk.key).unwrap(), secret.ticket_key(identity, ip, *epoch).unwrap());
        assert!(!out.contains(&secret.to_base64url()), "never an epoch secret");
    }
    assert_eq!(bundle.signing_key(now_ms()).unwrap().0, 2);

    // Another trust domain and the second overlay address.
    let args = issue(&["--workload", "shop/cart[Deployment]", "--trust-domain", "td.example", "--ip", "fd00::11"]);
    let bundle: KeyBundle = serde_json::from_str(&ok(&args.iter().map(String::as_str).collect::<Vec<_>>())).unwrap();
    let ip6: IpAddr = "fd00::11".parse().unwrap();
    assert_eq!(bundle.identity, "spiffe://td.example/ns/shop/sa/cart-sa");
    assert_eq!(
        WorkloadKey::from_base64url(&bundle.workload_keys[1].key).unwrap(),
        secrets[1].1.workload_key("spiffe://td.example/ns/shop/sa/cart-sa", ip6, 2).unwrap()
    );

    // A workload without a zone needs one: from --zone, or from the annotation.
    let args = issue(&["--workload", "shop/nozone"]);
    let err = fails(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(err.contains("has no zone") && err.contains("keyway.io/zone"), "{err}");
    let args = issue(&["--workload", "shop/nozone", "--zone", "zone-c"]);
    let bundle: KeyBundle = serde_json::from_str(&ok(&args.iter().map(String::as_str).collect::<Vec<_>>())).unwrap();
    assert_eq!(bundle.zone, "zone-c");

    for (extra, want) in [
        (&["--workload", "shop/noip"][..], "has no overlay address: add the annotation keyway.io/overlay-ips"),
        (&["--workload", "shop/cart", "--ip", "10.9.9.9"], "not an overlay address of shop/cart[Deployment]"),
        (&["--workload", "shop/cart", "--zone", "zone-b"], "is in zone \"zone-a\""),
        (&["--workload", "shop/absent"], "no such workload"),
        (&["--workload", "cart"], "expected NAMESPACE/NAME"),
    ] {
        let args = issue(extra);
        let err = fails(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(err.contains(want), "{extra:?}: {err}");
    }
    let err = fails(&[
        "keys",
        "issue",
        "--secrets",
        s(&dir.join("none.json")),
        "--workload",
        "shop/cart",
        "--inventory",
        s(&inv),
    ]);
    assert!(err.contains("none.json: cannot read"), "{err}");
}

#[test]
fn help_teaches_with_an_example_per_command() {
    for cmd in [["ca", "init"], ["ca", "issue"], ["keys", "init"], ["keys", "rotate"], ["keys", "issue"]] {
        let help = ok(&[cmd[0], cmd[1], "--help"]);
        assert!(help.contains(&format!("Example: keyway {} {}", cmd[0], cmd[1])), "{cmd:?}: {help}");
    }
}

/// A gateway's material from files made by the CLI.
fn gateway(ca: &Path, certs: &Path, zone: &str, name: &str) -> TlsMaterial {
    ok(&["ca", "issue", "--ca", s(ca), "--zone", zone, "--name", name, "--out", s(certs)]);
    TlsMaterial::load(
        &ca.join("ca.pem"),
        &certs.join(format!("{zone}-{name}.pem")),
        &certs.join(format!("{zone}-{name}-key.pem")),
    )
    .unwrap()
}

/// One QUIC handshake and one echoed stream: (the client's identity as the server saw it, the
/// server's identity as the client saw it), or the errors.
async fn exchange(
    server_m: &TlsMaterial,
    client_m: &TlsMaterial,
) -> (Result<GatewayIdentity, String>, Result<GatewayIdentity, String>) {
    let server =
        quinn::Endpoint::server(tls::quic_server_config(server_m).unwrap(), "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = server.local_addr().unwrap();
    let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    client.set_default_client_config(tls::quic_client_config(client_m).unwrap());
    let sni = tls::server_name(&server_m.identity().unwrap());
    let accept = async {
        let conn = server.accept().await.ok_or("endpoint closed")?.await.map_err(|e| e.to_string())?;
        let id = tls::peer_identity(&conn).map_err(|e| e.to_string())?;
        let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
        let data = recv.read_to_end(1024).await.map_err(|e| e.to_string())?;
        send.write_all(&data).await.map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        conn.closed().await;
        Ok::<_, String>(id)
    };
    let connect = async {
        let conn = client.connect(addr, &sni).map_err(|e| e.to_string())?.await.map_err(|e| e.to_string())?;
        let id = tls::peer_identity(&conn).map_err(|e| e.to_string())?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        send.write_all(b"hello over the overlay").await.map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        let echo = recv.read_to_end(1024).await.map_err(|e| e.to_string())?;
        assert_eq!(echo, b"hello over the overlay");
        conn.close(0u32.into(), b"done");
        Ok::<_, String>(id)
    };
    tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(accept, connect) })
        .await
        .expect("the exchange ends within the deadline")
}

#[tokio::test]
async fn quic_mutual_tls_with_cli_certificates() {
    let dir = tmpdir("quic");
    let (ca, other_ca, certs) = (dir.join("ca"), dir.join("other-ca"), dir.join("certs"));
    ok(&["ca", "init", "--out", s(&ca)]);
    ok(&["ca", "init", "--out", s(&other_ca)]);
    let a = gateway(&ca, &certs, "zone-a", "gw-1");
    let b = gateway(&ca, &certs, "zone-b", "gw-1");
    let (id_a, id_b) = (a.identity().unwrap(), b.identity().unwrap());
    assert_eq!(id_a.spiffe_id(), "spiffe://cluster.local/zone/zone-a/gateway/gw-1");

    // Both directions: each side learns the other's identity from its certificate.
    let (seen_by_a, seen_by_b) = exchange(&a, &b).await;
    assert_eq!((seen_by_a.unwrap(), seen_by_b.unwrap()), (id_b.clone(), id_a.clone()));
    let (seen_by_b, seen_by_a) = exchange(&b, &a).await;
    assert_eq!((seen_by_b.unwrap(), seen_by_a.unwrap()), (id_a, id_b));

    // The same names from another CA: refused by our server, and refused by our client.
    let intruder = gateway(&other_ca, &dir.join("other-certs"), "zone-b", "gw-1");
    let (server, client) = exchange(&a, &intruder).await;
    assert!(server.is_err(), "the server refuses a client of another CA: {server:?}");
    assert!(client.is_err(), "and the client's connection does not carry data: {client:?}");
    let (server, client) = exchange(&intruder, &a).await;
    let client = client.unwrap_err();
    assert!(client.contains("invalid peer certificate"), "{client}");
    assert!(server.is_err(), "{server:?}");
}
