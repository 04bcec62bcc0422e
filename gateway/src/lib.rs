//! `keyway-gateway`: the keyway gateway, a policy enforcement point (PEP) of one zone, and the
//! library behind the `keyway` command line.
//!
//! A gateway has four faces: the **tunnel** (HTTP/2 CONNECT from sidecars, with tokens), the
//! **overlay** (QUIC to the gateways of other zones, one stream per flow), **delivery** (HTTP/2
//! CONNECT to destination sidecars, with tickets) and **admin** (health, metrics, config dump,
//! peers, the key service), on its own small runtime.
//!
//! [`app::build_from`] starts one gateway from a configuration and an inventory source
//! ([`source::FileSource`], or the cluster with the `kubernetes` feature) and returns a handle
//! with its bound addresses; `main` and the tests both use it. The data path lives in [`proxy`].

pub mod admin;
pub mod agent;
pub mod app;
pub mod ca;
pub mod cli;
pub mod clock;
pub mod config;
pub mod keyservice;
#[cfg(feature = "kubernetes")]
pub mod kube_source;
/// The flow header (gateway to gateway), from `keyway-policy` where the other wire formats live.
pub use keyway_policy::flow;
pub mod mesh;
pub mod metrics;
pub mod proxy;
pub mod routing;
pub mod secrets;
pub mod source;
pub mod state;
pub mod tasks;
pub mod tls;
