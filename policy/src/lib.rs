//! `keyway-policy`: the pure core of keyway.
//!
//! * [`manifest`] loads Kubernetes manifests (YAML and JSON text, or parsed objects; `*List`
//!   flattening) into an [`inventory::Inventory`] of namespaces and workloads and a
//!   [`policy::PolicySet`] of NetworkPolicies and admin tiers; the Kubernetes decoding beneath it
//!   (`k8s`, private) is a leaf that the inventory and policy types do not depend on.
//! * [`engine::Engine`] compiles them once into tables; [`engine::Engine::decide`] answers one flow
//!   with its verdict and the rule that decided it, [`connlist`] computes the full connectivity.
//! * [`wire`] names the headers, filter state, paths and TLS names keyway speaks.
//! * [`auth`] derives workload and ticket keys and encodes, decodes and verifies tokens and tickets.
//!
//! Nothing in this crate performs I/O (except the optional directory reader behind the `fs`
//! feature), reads a clock or draws randomness: time and nonces are arguments.

pub mod auth;
pub mod connlist;
pub mod engine;
pub mod error;
pub mod flow;
#[cfg(feature = "fs")]
pub mod fs;
pub mod inventory;
pub mod ip;
mod k8s;
pub mod keyservice;
pub mod manifest;
pub mod policy;
pub mod ports;
pub mod selector;
pub mod wire;

pub use engine::{Decision, Engine, Verdict};
pub use error::{LoadError, Warning};
pub use inventory::Inventory;
pub use ports::{ConnSet, PortRanges, Protocol};
