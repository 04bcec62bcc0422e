//! The names keyway puts on the wire, in one place: the headers of the tunnel and of delivery,
//! the filter state the proxy-wasm filter shares with Envoy, the key service's path, and the
//! overlay's TLS names. The gateway, the filter, the test beds and the Istio manifests all speak
//! these; the manifests spell them in YAML, and `istio-check` holds the two to each other.

/// The CONNECT header carrying a workload's token (its sidecar to its zone's gateway).
pub const TOKEN_HEADER: &str = "x-keyway-token";
/// The CONNECT header carrying the ticket (the destination gateway to the destination sidecar).
pub const TICKET_HEADER: &str = "x-keyway-ticket";
/// The response header naming why a flow was refused.
pub const DENY_REASON_HEADER: &str = "x-keyway-deny-reason";
/// The response header naming the policy rule that denied a flow.
pub const RULE_HEADER: &str = "x-keyway-rule";

/// The filter state key under which the filter stores the token for `tcp_proxy`
/// (`set_property(["keyway_token"])`); Envoy names it [`TOKEN_FILTER_STATE`].
pub const TOKEN_PROPERTY: &str = "keyway_token";
/// The token's filter state as Envoy names it (proxy-wasm properties live under `wasm.`).
pub const TOKEN_FILTER_STATE: &str = "wasm.keyway_token";
/// The value of `tcp_proxy`'s `tunneling_config` header that sends the token as [`TOKEN_HEADER`].
pub const TOKEN_HEADER_VALUE: &str = "%FILTER_STATE(wasm.keyway_token:PLAIN)%";
/// The filter state key under which the filter stores the source identity a ticket proved (for
/// access logs).
pub const SOURCE_IDENTITY_PROPERTY: &str = "keyway_source_identity";

/// The key service's path on the gateway's admin port: `GET /v1/keys?ip=<overlay address>`.
pub const KEY_SERVICE_PATH: &str = "/v1/keys";
/// The key service's query parameter naming the workload's overlay address.
pub const KEY_SERVICE_IP_PARAM: &str = "ip";

/// The ALPN protocol of the overlay between gateways.
pub const ALPN: &[u8] = b"keyway/1";
/// The ALPN protocol of the edge: a `keyway agent` and the gateways of its zone.
pub const EDGE_ALPN: &[u8] = b"keyway-edge/1";
/// The DNS suffix of a gateway's overlay server name: `<name>.<zone>.gateway.keyway`.
pub const SERVER_NAME_SUFFIX: &str = "gateway.keyway";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_names_agree() {
        assert_eq!(TOKEN_FILTER_STATE, format!("wasm.{TOKEN_PROPERTY}"));
        assert_eq!(TOKEN_HEADER_VALUE, format!("%FILTER_STATE({TOKEN_FILTER_STATE}:PLAIN)%"));
    }
}
