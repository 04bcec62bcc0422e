//! `keyway-filter`: the keyway proxy-wasm module, a thin shell over `keyway-policy`.
//!
//! One module, three filters chosen by the plugin configuration's `mode`:
//!
//! * `outbound` (network filter before `tcp_proxy`): seals a token for each connection and
//!   stores it as filter state `wasm.keyway_token`, which `tcp_proxy`'s `tunneling_config` sends
//!   to the local gateway as `x-keyway-token`; with no usable key the connection is closed before
//!   any upstream connection is opened;
//! * `inbound_tunnel` (HTTP filter on the keyway inbound CONNECT listener): verifies
//!   `x-keyway-ticket` and accepts its nonce once per Envoy ([`replay`], in the host's shared data
//!   so every worker thread sees it), refuses with 403 and `x-keyway-deny-reason`;
//! * `inbound_plain` (network filter on every other inbound listener): closes every connection
//!   that is not exempt.
//!
//! Every decision is a pure function ([`verdict`], [`keystate`], [`config`], [`identity`],
//! [`replay`] over a store trait) tested on the host; the proxy-wasm contexts (`shell`, wasm32
//! only) read properties, call them and act.

pub mod config;
pub mod identity;
pub mod keystate;
pub mod metrics;
pub mod replay;
pub mod verdict;

#[cfg(target_arch = "wasm32")]
mod shell;
