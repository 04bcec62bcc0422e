//! `keyway`: the command line of keyway. Thin: parsing here, work in the library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use keyway_gateway::cli::{agent_cmd, ca_cmd, gateway_cmd, keys_cmd, policy_cmd};

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
    /// Run one gateway (policy enforcement point) of one zone.
    Gateway(gateway_cmd::GatewayArgs),
    /// The overlay certificate authority and gateway certificates.
    #[command(subcommand)]
    Ca(ca_cmd::CaCommand),
    /// Epoch secrets and workload keys.
    #[command(subcommand)]
    Keys(keys_cmd::KeysCommand),
    /// Inspect policies: the connectivity a manifest directory allows, and why one flow is
    /// allowed or denied.
    #[command(subcommand)]
    Policy(policy_cmd::PolicyCommand),
    // The help is AgentArgs' own (with its example configuration).
    Agent(agent_cmd::AgentArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Gateway(args) => gateway_cmd::run(args),
        Command::Ca(cmd) => ca_cmd::run(cmd),
        Command::Keys(cmd) => keys_cmd::run(cmd),
        Command::Policy(cmd) => policy_cmd::run(cmd),
        Command::Agent(args) => agent_cmd::run(args),
    }
}
