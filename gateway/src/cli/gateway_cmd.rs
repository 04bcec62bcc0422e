//! `keyway gateway --config FILE [--source file|kubernetes]`: run one gateway until SIGTERM
//! (graceful drain) or SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::config::Config;

/// Run one gateway (PEP) of one zone.
///
/// The configuration file (YAML) names the zone, this gateway, the TLS files of the overlay CA,
/// the epoch secrets, the manifest directory (inventory and policies) and every zone's gateways;
/// see docs/gateway.md, "Configuration". The inventory and secrets are reloaded when their
/// files change or on SIGHUP; a broken new set is rejected and the running one stays.
///
/// Logs: RUST_LOG (default info), LOG_FORMAT=json|plain (default plain).
///
/// With `--source kubernetes` (binaries built with the cargo feature `kubernetes`) the
/// inventory and policies come from the cluster instead, merged with the inventory directory
/// (the other zones' workloads); see gateway/KUBERNETES.md.
///
/// Example: keyway gateway --config /etc/keyway/gateway.yaml
#[derive(Debug, clap::Args)]
pub struct GatewayArgs {
    /// The configuration file.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Where the inventory and policies come from: `file` (the `inventory` directory) or
    /// `kubernetes` (the cluster's Namespaces, Pods, NetworkPolicies and admin policies, plus
    /// the `inventory` directory for other zones; needs the config's `kubernetes` section).
    #[arg(long, value_enum, default_value_t = Source::File)]
    pub source: Source,
    /// Check the configuration, inventory, secrets and certificates, print the effective
    /// configuration, and exit without opening any socket (with `--source kubernetes`: also
    /// that the `kubernetes` section is there; the API server is not contacted).
    #[arg(long)]
    pub check: bool,
}

/// Where the inventory and policies come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Source {
    /// The manifest directory named by `inventory`, reloaded when it changes.
    File,
    /// The cluster, watched with kube-rs (cargo feature `kubernetes`).
    Kubernetes,
}

/// Why `--source` cannot be used with this configuration or this binary.
fn source_error(source: Source, config: &Config) -> Option<String> {
    if source != Source::Kubernetes {
        return None;
    }
    if !cfg!(feature = "kubernetes") {
        return Some(
            "--source kubernetes: this keyway was built without the `kubernetes` feature; rebuild with \
             `cargo build -p keyway-gateway --features kubernetes` (or use --source file)"
                .to_owned(),
        );
    }
    if config.kubernetes.is_none() {
        return Some(format!(
            "--source kubernetes: the configuration has no `kubernetes` section; add at least \
             `kubernetes: {{prefix: <this zone's overlay prefix>}}` (zone {})",
            config.zone
        ));
    }
    None
}

/// Sets up logging from RUST_LOG and LOG_FORMAT.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let json = std::env::var("LOG_FORMAT").is_ok_and(|v| v == "json");
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    let _ = if json { builder.json().try_init() } else { builder.try_init() };
}

/// Runs the command.
pub fn run(args: GatewayArgs) -> ExitCode {
    init_logging();
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("keyway: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(e) = source_error(args.source, &config) {
        eprintln!("keyway: {e}");
        return ExitCode::from(2);
    }
    if args.check {
        return match crate::app::check(&config) {
            Ok(()) => {
                println!("{}", serde_json::to_string_pretty(&config).unwrap_or_default());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("keyway: {e:#}");
                ExitCode::from(2)
            }
        };
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keyway: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let drain = Duration::from_millis(config.drain_ms);
        let built = match args.source {
            Source::File => crate::app::build(config).await,
            #[cfg(feature = "kubernetes")]
            Source::Kubernetes => crate::kube_source::start_gateway(config).await,
            #[cfg(not(feature = "kubernetes"))]
            Source::Kubernetes => Err(anyhow::anyhow!("built without the `kubernetes` feature")),
        };
        let handle = match built {
            Ok(h) => h,
            Err(e) => {
                eprintln!("keyway: {e:#}");
                return ExitCode::from(2);
            }
        };
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        loop {
            tokio::select! {
                _ = async { match hup.as_mut() { Some(s) => { s.recv().await; } None => std::future::pending().await } } => {
                    tracing::info!(source = ?args.source, "SIGHUP: reloading the inventory source and the secrets");
                    handle.reload();
                }
                _ = async { match term.as_mut() { Some(s) => { s.recv().await; } None => std::future::pending().await } } => {
                    tracing::info!(deadline_ms = drain.as_millis() as u64, "SIGTERM: draining");
                    handle.shutdown(drain).await;
                    return ExitCode::SUCCESS;
                }
                _ = tokio::signal::ctrl_c() => {
                    tracing::info!("SIGINT: stopping");
                    handle.shutdown(Duration::from_millis(500)).await;
                    return ExitCode::SUCCESS;
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
zone: zone-a
name: gw-1
tls: {ca: ca.pem, cert: gw.pem, key: gw-key.pem}
mesh: {ca: mesh-ca.pem, cert: mesh.pem, key: mesh-key.pem}
secrets: epochs.json
inventory: manifests/
zones: [{name: zone-a, gateways: [{name: gw-1, address: "127.0.0.1:15443"}]}]
"#;

    #[test]
    fn source_kubernetes_needs_the_feature_and_the_section() {
        let plain = Config::parse(MINIMAL, "c.yaml").unwrap();
        assert_eq!(source_error(Source::File, &plain), None);
        let err = source_error(Source::Kubernetes, &plain).unwrap();
        let with = Config::parse(&format!("{MINIMAL}kubernetes: {{prefix: 10.128.1.0/24}}\n"), "c.yaml").unwrap();
        if cfg!(feature = "kubernetes") {
            assert!(err.contains("no `kubernetes` section"), "{err}");
            assert_eq!(source_error(Source::Kubernetes, &with), None);
        } else {
            assert!(err.contains("built without the `kubernetes` feature"), "{err}");
            let err = source_error(Source::Kubernetes, &with).unwrap();
            assert!(err.contains("--features kubernetes"), "{err}");
        }
    }
}
