//! The `keyway` command line: one module per command group.

pub mod agent_cmd;
pub mod ca_cmd;
pub mod gateway_cmd;
pub mod keys_cmd;
pub mod policy_cmd;
