#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test harness
//! `keyway policy` as a user runs it: real process, real files, exit codes and streams.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn keyway(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_keyway")).args(args).output().expect("run keyway")
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn tmpdir(name: &str, files: &[(&str, &str)]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("keyway-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for (f, t) in files {
        std::fs::write(dir.join(f), t).unwrap();
    }
    dir
}

#[test]
fn connlist_txt_is_byte_for_byte_upstreams() {
    let scenario = root().join("testdata/conformance/netpol-analyzer/new_online_boutique");
    let out = keyway(&["policy", "connlist", "--dir", scenario.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let expected = std::fs::read_to_string(scenario.join("expected_connlist.txt")).unwrap();
    assert_eq!(text(&out.stdout), expected);
}

#[test]
fn connlist_other_formats() {
    let dir = root().join("samples/shop");
    let dir = dir.to_str().unwrap();
    let json = keyway(&["policy", "connlist", "--dir", dir, "--output", "json"]);
    assert!(json.status.success());
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let lines = v.as_array().unwrap();
    assert!(lines.iter().any(|l| l["src"] == "shop/cart[Deployment]"
        && l["dst"] == "data/redis[Deployment]"
        && l["conn"] == "TCP 6379"));
    let md = text(&keyway(&["policy", "connlist", "--dir", dir, "-o", "md"]).stdout);
    assert!(md.starts_with("| src | dst | conn |\n"));
    assert_eq!(md.lines().count(), lines.len() + 2);
    let csv = text(&keyway(&["policy", "connlist", "--dir", dir, "-o", "csv"]).stdout);
    assert!(csv.contains("shop/cart[Deployment],data/redis[Deployment],\"TCP 6379\"\n"));
    let dot = text(&keyway(&["policy", "connlist", "--dir", dir, "-o", "dot"]).stdout);
    assert!(dot.starts_with("digraph {") && dot.contains("\"shop/cart[Deployment]\" -> \"data/redis[Deployment]\""));
}

#[test]
fn explain_names_the_deciding_rules() {
    let dir = root().join("samples/shop");
    let dir = dir.to_str().unwrap();
    let out =
        keyway(&["policy", "explain", "--dir", dir, "--src", "shop/cart", "--dst", "data/redis", "--port", "6379"]);
    let s = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(s.starts_with("ALLOW: shop/cart[Deployment] => data/redis[Deployment] : TCP 6379\n"), "{s}");
    assert!(s.contains("decided by: NetworkPolicy shop/cart-egress rule 0: Allow"), "{s}");
    assert!(
        s.contains("decided by: ANP protect-data rule 0: Pass → NetworkPolicy data/redis-ingress rule 0: Allow"),
        "{s}"
    );

    let out = keyway(&[
        "policy",
        "explain",
        "--dir",
        dir,
        "--src",
        "payments/payment-api",
        "--dst",
        "data/postgres",
        "--port",
        "5432/tcp",
    ]);
    let s = text(&out.stdout);
    assert!(s.starts_with("DENY: "), "{s}");
    assert!(s.contains("decided by: NetworkPolicy payments/payment-api: isolated, no rule allows: Deny"), "{s}");

    let out = keyway(&[
        "policy",
        "explain",
        "--dir",
        dir,
        "--src",
        "203.0.113.7",
        "--dst",
        "shop/frontend[Deployment]",
        "--port",
        "8080",
    ]);
    let s = text(&out.stdout);
    assert!(s.starts_with("ALLOW: 203.0.113.7 => shop/frontend[Deployment] : TCP 8080"), "{s}");
    assert!(s.contains("outside the inventory"), "{s}");

    // An overlay address stands for its workload.
    let out =
        keyway(&["policy", "explain", "--dir", dir, "--src", "10.128.1.11", "--dst", "10.128.3.11", "--port", "6379"]);
    assert!(text(&out.stdout).starts_with("ALLOW: shop/cart[Deployment] => data/redis[Deployment]"));
}

#[test]
fn bad_input_is_one_clear_line_and_exit_2() {
    let missing = keyway(&["policy", "connlist", "--dir", "/no/such/dir"]);
    assert_eq!(missing.status.code(), Some(2));
    assert_eq!(text(&missing.stderr).lines().count(), 1);
    assert!(text(&missing.stderr).contains("/no/such/dir: not a directory of manifests"));

    let dir = tmpdir("notyaml", &[("junk.yaml", "this: is: not: yaml\n")]);
    let out = keyway(&["policy", "connlist", "--dir", dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("junk.yaml: document 1: not valid YAML"), "{err}");

    let bad = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: a}\nspec:\n  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/40}}]}]\n";
    let dir = tmpdir("badpolicy", &[("np.yaml", bad)]);
    let out = keyway(&["policy", "connlist", "--dir", dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("np.yaml: NetworkPolicy a/p: spec.ingress[0].from[0].ipBlock.cidr: \"10.0.0.0/40\" is not a CIDR"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");

    let dup =
        "kind: NetworkPolicy\nmetadata: {name: p}\nspec: {}\n---\nkind: NetworkPolicy\nmetadata: {name: p}\nspec: {}\n";
    let dir = tmpdir("dup", &[("np.yaml", dup)]);
    let err = text(&keyway(&["policy", "connlist", "--dir", dir.to_str().unwrap()]).stderr);
    assert!(err.contains("NetworkPolicy default/p: defined twice"), "{err}");

    let shop = root().join("samples/shop");
    let shop = shop.to_str().unwrap();
    let out = keyway(&["policy", "explain", "--dir", shop, "--src", "shop/nope", "--dst", "data/redis", "--port", "1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--src shop/nope: no such workload (workloads in shop: shop/cart[Deployment]"));
    let out =
        keyway(&["policy", "explain", "--dir", shop, "--src", "shop/cart", "--dst", "data/redis", "--port", "70000"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--port 70000: \"70000\" is not a port number"));
    let out =
        keyway(&["policy", "explain", "--dir", shop, "--src", "shop/cart", "--dst", "data/redis", "--port", "53/ICMP"]);
    assert!(text(&out.stderr).contains("unknown protocol \"ICMP\""));
}

#[test]
fn warnings_go_to_stderr_and_do_not_fail() {
    let files = [(
        "a.yaml",
        "kind: Pod\nmetadata: {name: a}\n---\nkind: NetworkPolicy\nmetadata: {name: p}\nspec:\n  podSelector: {}\n  ingress: [{ports: [{port: web}]}]\n",
    )];
    let dir = tmpdir("warn", &files);
    let out = keyway(&["policy", "connlist", "--dir", dir.to_str().unwrap()]);
    assert!(out.status.success());
    let err = text(&out.stderr);
    assert!(err.starts_with("warning: ") && err.contains("named port \"web\""), "{err}");
}

#[test]
fn connlist_skips_files_that_are_not_manifests() {
    // The analysis itself, saved next to the manifests as JSON and as YAML: skipped with a warning.
    let shop = root().join("samples/shop");
    let expected = keyway(&["policy", "connlist", "--dir", shop.to_str().unwrap()]);
    assert!(expected.status.success(), "{}", text(&expected.stderr));
    let json = keyway(&["policy", "connlist", "--dir", shop.to_str().unwrap(), "-o", "json"]).stdout;
    let manifests = ["namespaces.yaml", "workloads.yaml", "services.yaml", "admin.yaml", "networkpolicies.yaml"];
    let mut files: Vec<(String, String)> =
        manifests.iter().map(|f| ((*f).to_owned(), std::fs::read_to_string(shop.join(f)).unwrap())).collect();
    files.push(("connlist_output.json".to_owned(), text(&json)));
    files.push(("summary.yaml".to_owned(), "workloads: 9\nreviewed: [cart, redis]\n".to_owned()));
    let refs: Vec<(&str, &str)> = files.iter().map(|(f, t)| (f.as_str(), t.as_str())).collect();
    let dir = tmpdir("analysis", &refs);
    let out = keyway(&["policy", "connlist", "--dir", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), text(&expected.stdout));
    let skipped: Vec<String> = text(&out.stderr).lines().filter(|l| l.contains("skipped")).map(str::to_owned).collect();
    let note = "skipped: not a Kubernetes manifest (no document has apiVersion or kind)";
    assert_eq!(
        skipped,
        [
            format!("warning: {}: {note}", dir.join("connlist_output.json").display()),
            format!("warning: {}: {note}", dir.join("summary.yaml").display()),
        ]
    );

    // A malformed object of a Kubernetes kind beside them still fails, naming file, object and field.
    let bad = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: shop}\nspec: {podSelector: 3}\n";
    std::fs::write(dir.join("bad.yaml"), bad).unwrap();
    let out = keyway(&["policy", "connlist", "--dir", dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("bad.yaml: NetworkPolicy shop/p: spec.podSelector: invalid type"), "{err}");
}

#[test]
fn gateway_check_verifies_everything_and_opens_nothing() {
    let dir = tmpdir("gwcheck", &[]);
    let d = |p: &str| dir.join(p).to_str().unwrap().to_owned();
    assert!(keyway(&["ca", "init", "--out", &d("ca")]).status.success());
    assert!(
        keyway(&["ca", "issue", "--ca", &d("ca"), "--zone", "zone-a", "--name", "gw-1", "--out", &d("certs")])
            .status
            .success()
    );
    assert!(keyway(&["keys", "init", "--out", &d("epochs.json")]).status.success());
    // The gateway's mesh certificate, from a mesh CA (where no istiod issues it).
    assert!(keyway(&["ca", "init", "--out", &d("mesh-ca")]).status.success());
    let out = keyway(&[
        "ca",
        "issue-workload",
        "--ca",
        &d("mesh-ca"),
        "--namespace",
        "keyway-system",
        "--service-account",
        "keyway-gateway",
        "--out",
        &d("mesh"),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("issued spiffe://cluster.local/ns/keyway-system/sa/keyway-gateway"));
    let mode = std::fs::metadata(dir.join("mesh/keyway-system-keyway-gateway-key.pem")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the key is private");
    let shop = root().join("samples/shop");
    let config = format!(
        "zone: zone-a\nname: gw-1\ntls: {{ca: {}, cert: {}, key: {}}}\nmesh: {{ca: {}, cert: {}, key: {}}}\nsecrets: {}\ninventory: {}\nzones:\n- name: zone-a\n  gateways: [{{name: gw-1, address: \"127.0.0.1:1\"}}]\n",
        d("ca/ca.pem"),
        d("certs/zone-a-gw-1.pem"),
        d("certs/zone-a-gw-1-key.pem"),
        d("mesh-ca/ca.pem"),
        d("mesh/keyway-system-keyway-gateway.pem"),
        d("mesh/keyway-system-keyway-gateway-key.pem"),
        d("epochs.json"),
        shop.display()
    );
    std::fs::write(dir.join("gw.yaml"), &config).unwrap();
    let out = keyway(&["gateway", "--config", &d("gw.yaml"), "--check"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let effective: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(effective["listen"]["tunnel"], "0.0.0.0:15180", "defaults are shown");

    // A certificate for another gateway, an unknown field, a broken inventory: exit 2, one line.
    std::fs::write(
        dir.join("bad1.yaml"),
        config.replace("name: gw-1\ntls", "name: gw-2\ntls").replace("{name: gw-1,", "{name: gw-2,"),
    )
    .unwrap();
    let out = keyway(&["gateway", "--config", &d("bad1.yaml"), "--check"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("the certificate is for spiffe://cluster.local/zone/zone-a/gateway/gw-1"),
        "{}",
        text(&out.stderr)
    );
    std::fs::write(dir.join("bad2.yaml"), format!("{config}colour: blue\n")).unwrap();
    let out = keyway(&["gateway", "--config", &d("bad2.yaml"), "--check"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("unknown field `colour`"), "{}", text(&out.stderr));
    std::fs::write(dir.join("bad3.yaml"), config.replace(&shop.display().to_string(), "/no/such/inventory")).unwrap();
    let out = keyway(&["gateway", "--config", &d("bad3.yaml"), "--check"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("/no/such/inventory"), "{}", text(&out.stderr));
    // A mesh certificate of another mesh's CA: refused, naming the files.
    let bad4 = config.replace(&d("mesh-ca/ca.pem"), &d("ca/ca.pem"));
    std::fs::write(dir.join("bad4.yaml"), bad4).unwrap();
    let out = keyway(&["gateway", "--config", &d("bad4.yaml"), "--check"]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("mesh:") && err.contains("keyway-system-keyway-gateway.pem: does not verify against the CA"),
        "{err}"
    );
}

#[test]
fn ca_issue_device_then_revoke_it() {
    let dir = tmpdir("device", &[]);
    let d = |p: &str| dir.join(p).to_str().unwrap().to_owned();
    assert!(keyway(&["ca", "init", "--out", &d("ca")]).status.success());
    let issue = |ca: &str, out: &str| {
        keyway(&[
            "ca",
            "issue-device",
            "--ca",
            ca,
            "--namespace",
            "field",
            "--service-account",
            "laptop-7",
            "--out",
            out,
        ])
    };
    let out = issue(&d("ca"), &d("dev"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("issued device spiffe://cluster.local/ns/field/sa/laptop-7, valid 90 days\n"),
        "{}",
        text(&out.stdout)
    );
    let mode = std::fs::metadata(dir.join("dev/field-laptop-7-key.pem")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the key is private");

    let out = keyway(&["ca", "revoke", "--ca", &d("ca"), "--cert", &d("dev/field-laptop-7.pem")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    assert!(
        shown.starts_with("revoked serial ") && shown.contains(": 1 certificate(s) revoked, CRL number 1,"),
        "{shown}"
    );
    assert!(shown.contains(&format!("{}\tthe revocation list", d("ca/revoked.pem"))), "{shown}");
    let out = keyway(&["ca", "revoke", "--ca", &d("ca"), "--refresh"]);
    assert!(text(&out.stdout).starts_with("revocation list signed again: 1 certificate(s) revoked, CRL number 2,"));

    // Another CA's certificate: refused, exit 2; neither --cert nor --refresh: a usage error.
    assert!(keyway(&["ca", "init", "--out", &d("other")]).status.success());
    assert!(issue(&d("other"), &d("other-dev")).status.success());
    let out = keyway(&["ca", "revoke", "--ca", &d("ca"), "--cert", &d("other-dev/field-laptop-7.pem")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("not issued by this CA"), "{}", text(&out.stderr));
    assert_eq!(keyway(&["ca", "revoke", "--ca", &d("ca")]).status.code(), Some(2));
}

#[test]
fn connlist_shows_devices_both_ways() {
    let dir = root().join("samples/devices");
    let out = keyway(&["policy", "connlist", "--dir", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let device: Vec<String> =
        text(&out.stdout).lines().filter(|l| l.contains("WorkloadEntry")).map(str::to_owned).collect();
    assert_eq!(
        device,
        [
            "field/laptop-7[WorkloadEntry] => tools/wiki[Deployment] : TCP 8080",
            "tools/backup[Deployment] => field/laptop-7[WorkloadEntry] : TCP 22",
        ]
    );
    let explain = keyway(&[
        "policy",
        "explain",
        "--dir",
        dir.to_str().unwrap(),
        "--src",
        "tools/wiki",
        "--dst",
        "field/laptop-7",
        "--port",
        "22/TCP",
    ]);
    assert!(
        text(&explain.stdout).starts_with("DENY: tools/wiki[Deployment] => field/laptop-7[WorkloadEntry] : TCP 22"),
        "{}",
        text(&explain.stdout)
    );
}
