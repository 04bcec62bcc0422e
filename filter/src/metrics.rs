//! Metric names. Labels are encoded in the name the way Istio's own wasm stats are
//! (`name_label=.=value;.;`), so Envoy's tag extraction (Istio: `extraStatTags`; plain Envoy:
//! `stats_config.stats_tags` with the regex `(_?label=\.=(.*?);\.;)`) turns them into Prometheus
//! labels. Every label value is from a fixed set.

use crate::config::Mode;
use crate::keystate::RefreshOutcome;
use crate::verdict::ALL_REASONS;

/// Connections by `direction` (the mode) and `verdict` (`allow`, `deny`, `fail_open`).
pub const CONNECTIONS: &str = "keyway_filter_connections_total";
/// Refusals by `reason`.
pub const DENIALS: &str = "keyway_filter_denials_total";
/// Key refreshes by `outcome`.
pub const KEY_REFRESHES: &str = "keyway_filter_key_refreshes_total";

/// Every verdict label.
pub const VERDICTS: [&str; 3] = ["allow", "deny", "fail_open"];

/// `keyway_filter_connections_total` for one direction and verdict.
pub fn connections(mode: Mode, verdict: &str) -> String {
    format!("{CONNECTIONS}_direction=.={};.;verdict=.={verdict};.;", mode.as_str())
}

/// `keyway_filter_denials_total` for one reason.
pub fn denials(reason: &str) -> String {
    format!("{DENIALS}_reason=.={reason};.;")
}

/// `keyway_filter_key_refreshes_total` for one outcome.
pub fn key_refreshes(outcome: RefreshOutcome) -> String {
    format!("{KEY_REFRESHES}_outcome=.={};.;", outcome.as_str())
}

/// Every metric a filter in `mode` defines up front (so each shows as 0 before it counts).
pub fn all(mode: Mode) -> Vec<String> {
    let mut names: Vec<String> = VERDICTS.iter().map(|v| connections(mode, v)).collect();
    names.extend(ALL_REASONS.iter().map(|r| denials(r)));
    if mode != Mode::InboundPlain {
        names.extend(RefreshOutcome::ALL.iter().map(|o| key_refreshes(*o)));
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(
            connections(Mode::Outbound, "allow"),
            "keyway_filter_connections_total_direction=.=outbound;.;verdict=.=allow;.;"
        );
        assert_eq!(denials("ticket-mac"), "keyway_filter_denials_total_reason=.=ticket-mac;.;");
        assert_eq!(key_refreshes(RefreshOutcome::Ok), "keyway_filter_key_refreshes_total_outcome=.=ok;.;");
        assert_eq!(all(Mode::InboundPlain).len(), 3 + ALL_REASONS.len());
        assert_eq!(all(Mode::Outbound).len(), 3 + ALL_REASONS.len() + RefreshOutcome::ALL.len());
    }
}
