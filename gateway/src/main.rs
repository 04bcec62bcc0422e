//! `keyway`: the command line of keyway (policy tools now; the gateway joins it later).

mod policy_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Keyway: Layer-3 network-policy enforcement for Istio service meshes, on any CNI.
///
/// Kubernetes NetworkPolicy, AdminNetworkPolicy and BaselineAdminNetworkPolicy, enforced by
/// keyway gateways between zones and by a proxy-wasm filter in every sidecar.
///
/// Start with `keyway policy connlist --dir samples/shop` to see what a set of manifests allows,
/// and `keyway policy explain` to see why one flow is allowed or denied.
#[derive(Debug, Parser)]
#[command(name = "keyway", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Inspect policies: the connectivity a manifest directory allows, and why one flow is
    /// allowed or denied.
    #[command(subcommand)]
    Policy(policy_cmd::PolicyCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Policy(cmd) => policy_cmd::run(cmd),
    }
}
