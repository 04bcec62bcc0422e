//! The network filter contexts: `outbound` (a token for `tcp_proxy`) and `inbound_plain`
//! (default deny). Both decide in `on_new_connection`, before `tcp_proxy` opens any upstream
//! connection: a refusal closes the downstream connection and pauses the filter chain.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, StreamContext};
use proxy_wasm::types::{Action, LogLevel};

use keyway_policy::wire::TOKEN_PROPERTY;

use super::{Shared, log, now_ms, property};
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
        let mut nonce = [0u8; 12];
        let nonce = getrandom::fill(&mut nonce).ok().map(|()| nonce);
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
                s.metrics.connection("allow");
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

    fn plain(&self) -> bool {
        let src = property(vec!["source", "address"]).as_deref().and_then(parse_address).map(|a| a.ip());
        let dst_port = property(vec!["destination", "address"]).as_deref().and_then(parse_address).map(|a| a.port());
        let mut s = self.state.borrow_mut();
        match verdict::inbound_plain(&s.exemptions, src, dst_port) {
            Verdict::Allow(()) => {
                s.metrics.connection("allow");
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
