//! Ticket decoders on arbitrary input: never panic, and whatever decodes is canonical (sealing
//! its claims again gives back the same signed bytes).

#![no_main]

use keyway_policy::auth::{TicketKey, decode_ticket, decode_ticket_bytes};
use libfuzzer_sys::fuzz_target;

/// The key the seed corpus is sealed with (`seeds.py`), so valid seeds reach the success path.
const KEY: TicketKey = TicketKey::from_bytes([9; 32]);

fuzz_target!(|data: &[u8]| {
    if let Ok(ticket) = decode_ticket_bytes(data) {
        let claims = ticket.claims().clone();
        let Ok(resealed) = claims.seal_bytes(&KEY) else {
            panic!("a decoded ticket must seal again");
        };
        assert_eq!(resealed.len(), data.len());
        let signed = data.len().saturating_sub(16);
        assert_eq!(resealed.get(..signed), data.get(..signed), "ticket encoding is not canonical");
        if let Ok(verified) = ticket.verify(&KEY, claims.issued_at_ms, 0, claims.dst, claims.dst_port) {
            assert_eq!(verified, claims);
            assert_eq!(resealed, data, "a verified ticket must be the one we seal");
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(ticket) = decode_ticket(text) {
            let c = ticket.claims();
            if ticket.verify(&KEY, c.issued_at_ms, 0, c.dst, c.dst_port).is_ok() {
                assert_eq!(c.seal(&KEY).ok().as_deref(), Some(text), "not the ticket we seal");
            }
        }
    }
});
