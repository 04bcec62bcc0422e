//! The HTTP filter context of the keyway inbound CONNECT listener: a valid `x-keyway-ticket`
//! lets the CONNECT continue to the `connect_config` route; anything else gets 403 with
//! `x-keyway-deny-reason`.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, MapType};

use keyway_policy::wire::{DENY_REASON_HEADER, SOURCE_IDENTITY_PROPERTY, TICKET_HEADER};

use super::{HostStore, Shared, now_ms, tunnel_check};
use crate::verdict::{self, Action as Verdict};

pub(super) struct Tunnel {
    pub(super) state: Shared,
}

impl Context for Tunnel {}

impl HttpContext for Tunnel {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let header = |name| hostcalls::get_map_value(MapType::HttpRequestHeaders, name).ok().flatten();
        let ticket = header(TICKET_HEADER);
        let authority = header(":authority");
        let now = now_ms();
        let mut guard = self.state.borrow_mut();
        let s = &mut *guard;
        let Some(check) = tunnel_check(s) else { return deny("no-identity") };
        let replay = s.replay.as_ref().map(|set| (set, &HostStore));
        let action =
            verdict::inbound_tunnel_shared(&check, &s.keys, replay, ticket.as_deref(), authority.as_deref(), now);
        match action {
            Verdict::Allow(claims) => {
                s.metrics.allowed();
                let _ = hostcalls::set_property(vec![SOURCE_IDENTITY_PROPERTY], Some(claims.src_identity.as_bytes()));
                let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, TICKET_HEADER, None);
                Action::Continue
            }
            // The tunnel verdict never fails open; were it to, the tunnel would still refuse.
            Verdict::Deny(d) | Verdict::FailOpen(d) => {
                s.metrics.refused(&d, false, &format!("CONNECT {authority:?}"));
                deny(d.reason)
            }
        }
    }
}

fn deny(reason: &str) -> Action {
    let body = format!("keyway: tunnel refused: {reason}\n");
    let _ = hostcalls::send_http_response(403, vec![(DENY_REASON_HEADER, reason)], Some(body.as_bytes()));
    Action::Pause
}
