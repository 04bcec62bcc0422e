//! The network filter contexts: `outbound` (a token for `tcp_proxy`) and `inbound_plain`
//! (default deny). Both decide in `on_new_connection`, before `tcp_proxy` opens any upstream
//! connection: a refusal closes the downstream connection and pauses the filter chain.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, StreamContext};
use proxy_wasm::types::{Action, LogLevel};

use keyway_policy::wire::TOKEN_PROPERTY;

use super::{Shared, log, nonce, now_ms, property};
use crate::config::Mode;
use crate::verdict::{self, Action as Verdict, parse_address};

pub(super) struct Connection {
    pub(super) state: Shared,
}

impl Context for Connection {}

impl StreamContext for Connection {
    fn on_new_connection(&mut self) -> Action {
        let mode = self.state.borrow().settings.mode;
        let allowed = match mode {
            Mode::Outbound => self.outbound(),
            Mode::InboundPlain => self.plain(),
            Mode::InboundTunnel => false,
        };
        if allowed {
            Action::Continue
        } else {
            let _ = hostcalls::close_downstream();
            Action::Pause
        }
    }
}

impl Connection {
    fn outbound(&self) -> bool {
        let dst = property(vec!["destination", "address"]).as_deref().and_then(parse_address);
        let nonce = nonce();
        let now = now_ms();
        let mut s = self.state.borrow_mut();
        let Some(src) = s.identity.as_ref().map(|i| i.overlay_ip) else { return false };
        let action = verdict::outbound(&s.keys, src, dst, now, nonce, s.settings.fail_open);
        match action {
            Verdict::Allow(token) => {
                if let Err(status) = hostcalls::set_property(vec![TOKEN_PROPERTY], Some(token.text.as_bytes())) {
                    log(LogLevel::Error, &format!("keyway outbound: cannot set the token ({status:?}); closing"));
                    s.metrics.connection("deny");
                    return false;
                }
                s.metrics.allowed();
                true
            }
            Verdict::FailOpen(d) => {
                s.metrics.refused(&d, true, &format!("connection to {dst:?}"));
                true
            }
            Verdict::Deny(d) => {
                s.metrics.refused(&d, false, &format!("connection to {dst:?}"));
                false
            }
        }
    }

    /// Reads only the addresses an exemption can match: the destination port when ports are
    /// exempt, then the source when sources are and the port was not; a refusal reads both for
    /// its log line. An address no exemption can match never changes the verdict, so it is the
    /// one reading both up front gives.
    fn plain(&self) -> bool {
        let read_port =
            || property(vec!["destination", "address"]).as_deref().and_then(parse_address).map(|a| a.port());
        let read_src = || property(vec!["source", "address"]).as_deref().and_then(parse_address).map(|a| a.ip());
        let (by_port, by_source) = {
            let s = self.state.borrow();
            (!s.exemptions.ports.is_empty(), !s.exemptions.cidrs.is_empty())
        };
        let dst_port = if by_port { read_port() } else { None };
        let mut s = self.state.borrow_mut();
        let mut action = verdict::inbound_plain(&s.exemptions, None, dst_port);
        let mut src = None;
        if by_source && matches!(action, Verdict::Deny(_)) {
            src = read_src();
            action = verdict::inbound_plain(&s.exemptions, src, dst_port);
        }
        if matches!(action, Verdict::Deny(_)) {
            let (src, dst_port) = (src.or_else(read_src), dst_port.or_else(read_port));
            action = verdict::inbound_plain(&s.exemptions, src, dst_port);
        }
        match action {
            Verdict::Allow(()) => {
                s.metrics.allowed();
                true
            }
            Verdict::FailOpen(d) => {
                s.metrics.refused(&d, true, "plain inbound connection");
                true
            }
            Verdict::Deny(d) => {
                s.metrics.refused(&d, false, "plain inbound connection");
                false
            }
        }
    }
}
