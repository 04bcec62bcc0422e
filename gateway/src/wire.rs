//! The wire names the gateway speaks (headers of the tunnel and of delivery).

/// The header carrying the token (sidecar to gateway).
pub const TOKEN_HEADER: &str = "x-keyway-token";
/// The header carrying the ticket (gateway to sidecar).
pub const TICKET_HEADER: &str = "x-keyway-ticket";
/// The header carrying a refusal's reason.
pub const DENY_REASON_HEADER: &str = "x-keyway-deny-reason";
/// The header naming the rule that denied a flow.
pub const RULE_HEADER: &str = "x-keyway-rule";
