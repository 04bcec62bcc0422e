//! `keyway gateway --config FILE`: run one gateway until SIGTERM (graceful drain) or SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::config::Config;

/// Run one gateway (PEP) of one zone.
///
/// The configuration file (YAML) names the zone, this gateway, the TLS files of the overlay CA,
/// the epoch secrets, the manifest directory (inventory and policies) and every zone's gateways;
/// see the README's "Gateway configuration". The inventory and secrets are reloaded when their
/// files change or on SIGHUP; a broken new set is rejected and the running one stays.
///
/// Logs: RUST_LOG (default info), LOG_FORMAT=json|plain (default plain).
///
/// Example: keyway gateway --config /etc/keyway/gateway.yaml
#[derive(Debug, clap::Args)]
pub struct GatewayArgs {
    /// The configuration file.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Check the configuration, inventory, secrets and certificates, print the effective
    /// configuration, and exit without opening any socket.
    #[arg(long)]
    pub check: bool,
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
        let handle = match crate::app::build(config).await {
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
                    tracing::info!("SIGHUP: reloading inventory, policies and secrets");
                    let state = handle.ctx.state.clone();
                    let _ = tokio::task::spawn_blocking(move || state.reload(true)).await;
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
