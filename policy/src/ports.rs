//! Protocols, port ranges and connection sets (per-protocol unions of port ranges).

use std::fmt;

/// A transport protocol that Kubernetes NetworkPolicy can name.
///
/// The order is the order of their names (`SCTP` < `TCP` < `UDP`), which is the order the
/// connectivity list prints them in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    /// SCTP.
    Sctp,
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    /// Every protocol, in printing order.
    pub const ALL: [Protocol; 3] = [Protocol::Sctp, Protocol::Tcp, Protocol::Udp];

    /// Parses a Kubernetes protocol name (`TCP`, `UDP`, `SCTP`; exact case, as the API requires).
    pub fn parse(s: &str) -> Option<Protocol> {
        match s {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }

    /// The Kubernetes name of the protocol.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }

    /// The IANA protocol number (6, 17, 132), as carried in tokens.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }

    /// The protocol for an IANA protocol number.
    pub fn from_number(n: u8) -> Option<Protocol> {
        match n {
            6 => Some(Protocol::Tcp),
            17 => Some(Protocol::Udp),
            132 => Some(Protocol::Sctp),
            _ => None,
        }
    }

    fn index(self) -> usize {
        match self {
            Protocol::Sctp => 0,
            Protocol::Tcp => 1,
            Protocol::Udp => 2,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The lowest port a policy can name.
pub const MIN_PORT: u16 = 1;
/// The highest port a policy can name.
pub const MAX_PORT: u16 = 65535;

/// A sorted union of disjoint, non-adjacent, inclusive port ranges within `1..=65535`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortRanges(Vec<(u16, u16)>);

impl PortRanges {
    /// No port.
    pub fn empty() -> Self {
        PortRanges(Vec::new())
    }

    /// Every port, `1-65535`.
    pub fn all() -> Self {
        PortRanges(vec![(MIN_PORT, MAX_PORT)])
    }

    /// The inclusive range `lo..=hi`, clamped to `1..=65535` (empty when `lo > hi`).
    pub fn range(lo: u16, hi: u16) -> Self {
        let lo = lo.max(MIN_PORT);
        if lo > hi {
            return Self::empty();
        }
        PortRanges(vec![(lo, hi)])
    }

    /// Whether no port is in the set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether every port is in the set.
    pub fn is_all(&self) -> bool {
        self.0.as_slice() == [(MIN_PORT, MAX_PORT)]
    }

    /// Whether `port` is in the set.
    pub fn contains(&self, port: u16) -> bool {
        let i = self.0.partition_point(|&(_, hi)| hi < port);
        self.0.get(i).is_some_and(|&(lo, _)| lo <= port)
    }

    /// The ranges, sorted.
    pub fn ranges(&self) -> &[(u16, u16)] {
        &self.0
    }

    /// The union.
    pub fn union(&self, other: &Self) -> Self {
        let mut all: Vec<(u16, u16)> = self.0.iter().chain(other.0.iter()).copied().collect();
        all.sort_unstable();
        let mut out: Vec<(u16, u16)> = Vec::with_capacity(all.len());
        for (lo, hi) in all {
            match out.last_mut() {
                Some(last) if u32::from(lo) <= u32::from(last.1) + 1 => last.1 = last.1.max(hi),
                _ => out.push((lo, hi)),
            }
        }
        PortRanges(out)
    }

    /// The intersection.
    pub fn intersect(&self, other: &Self) -> Self {
        let (mut i, mut j) = (0, 0);
        let mut out = Vec::new();
        while let (Some(&(a0, a1)), Some(&(b0, b1))) = (self.0.get(i), other.0.get(j)) {
            let lo = a0.max(b0);
            let hi = a1.min(b1);
            if lo <= hi {
                out.push((lo, hi));
            }
            if a1 < b1 {
                i += 1;
            } else {
                j += 1;
            }
        }
        PortRanges(out)
    }

    /// The ports of `self` that are not in `other`.
    pub fn subtract(&self, other: &Self) -> Self {
        self.intersect(&other.complement())
    }

    /// Every port not in the set.
    pub fn complement(&self) -> Self {
        let mut out = Vec::new();
        let mut next: u32 = u32::from(MIN_PORT);
        for &(lo, hi) in &self.0 {
            if u32::from(lo) > next {
                out.push((next as u16, lo - 1));
            }
            next = u32::from(hi) + 1;
        }
        if next <= u32::from(MAX_PORT) {
            out.push((next as u16, MAX_PORT));
        }
        PortRanges(out)
    }
}

impl fmt::Display for PortRanges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, &(lo, hi)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if lo == hi {
                write!(f, "{lo}")?;
            } else {
                write!(f, "{lo}-{hi}")?;
            }
        }
        Ok(())
    }
}

/// A set of connections: for each protocol, the ports it covers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnSet {
    by_proto: [PortRanges; 3],
}

impl ConnSet {
    /// No connection.
    pub fn empty() -> Self {
        ConnSet::default()
    }

    /// Every port of every protocol.
    pub fn all() -> Self {
        ConnSet { by_proto: [PortRanges::all(), PortRanges::all(), PortRanges::all()] }
    }

    /// The given ports of one protocol.
    pub fn of(proto: Protocol, ports: PortRanges) -> Self {
        let mut c = ConnSet::empty();
        *c.ports_mut(proto) = ports;
        c
    }

    /// One port of one protocol.
    pub fn single(proto: Protocol, port: u16) -> Self {
        ConnSet::of(proto, PortRanges::range(port, port))
    }

    /// The ports of `proto` in the set.
    pub fn ports(&self, proto: Protocol) -> &PortRanges {
        // `index()` is always 0..=2.
        match self.by_proto.get(proto.index()) {
            Some(p) => p,
            None => &self.by_proto[0],
        }
    }

    fn ports_mut(&mut self, proto: Protocol) -> &mut PortRanges {
        let [s, t, u] = &mut self.by_proto;
        match proto {
            Protocol::Sctp => s,
            Protocol::Tcp => t,
            Protocol::Udp => u,
        }
    }

    /// Whether the set holds no connection.
    pub fn is_empty(&self) -> bool {
        self.by_proto.iter().all(PortRanges::is_empty)
    }

    /// Whether the set holds every connection.
    pub fn is_all(&self) -> bool {
        self.by_proto.iter().all(PortRanges::is_all)
    }

    /// Whether `(proto, port)` is in the set.
    pub fn contains(&self, proto: Protocol, port: u16) -> bool {
        self.ports(proto).contains(port)
    }

    fn zip(&self, other: &Self, f: impl Fn(&PortRanges, &PortRanges) -> PortRanges) -> Self {
        let mut out = ConnSet::empty();
        for p in Protocol::ALL {
            *out.ports_mut(p) = f(self.ports(p), other.ports(p));
        }
        out
    }

    /// The union.
    pub fn union(&self, other: &Self) -> Self {
        self.zip(other, PortRanges::union)
    }

    /// The intersection.
    pub fn intersect(&self, other: &Self) -> Self {
        self.zip(other, PortRanges::intersect)
    }

    /// The connections of `self` that are not in `other`.
    pub fn subtract(&self, other: &Self) -> Self {
        self.zip(other, PortRanges::subtract)
    }

    /// Adds `other` to `self`.
    pub fn add(&mut self, other: &Self) {
        *self = self.union(other);
    }
}

impl fmt::Display for ConnSet {
    /// The connectivity-list form: `All Connections`, or `PROTO ports` groups joined with `,`
    /// (`No Connections` for the empty set, which the connectivity list never prints).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_all() {
            return f.write_str("All Connections");
        }
        if self.is_empty() {
            return f.write_str("No Connections");
        }
        let mut first = true;
        for p in Protocol::ALL {
            let ports = self.ports(p);
            if ports.is_empty() {
                continue;
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            write!(f, "{p} {ports}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pr(v: &[(u16, u16)]) -> PortRanges {
        v.iter().fold(PortRanges::empty(), |acc, &(a, b)| acc.union(&PortRanges::range(a, b)))
    }

    #[test]
    fn union_merges_adjacent_and_overlapping() {
        assert_eq!(pr(&[(1, 5), (6, 9), (20, 30), (25, 40)]).ranges(), &[(1, 9), (20, 40)]);
    }

    #[test]
    fn complement_and_subtract() {
        assert_eq!(pr(&[(80, 80)]).complement().ranges(), &[(1, 79), (81, 65535)]);
        assert!(PortRanges::all().complement().is_empty());
        assert!(PortRanges::empty().complement().is_all());
        assert_eq!(pr(&[(1, 100)]).subtract(&pr(&[(50, 60)])).ranges(), &[(1, 49), (61, 100)]);
    }

    #[test]
    fn display_matches_connlist_grammar() {
        assert_eq!(ConnSet::all().to_string(), "All Connections");
        let c = ConnSet::of(Protocol::Tcp, pr(&[(10053, 10054)])).union(&ConnSet::single(Protocol::Udp, 10053));
        assert_eq!(c.to_string(), "TCP 10053-10054,UDP 10053");
        let c = ConnSet::of(Protocol::Sctp, PortRanges::all())
            .union(&ConnSet::of(Protocol::Tcp, PortRanges::all()))
            .union(&ConnSet::of(Protocol::Udp, pr(&[(1, 5352), (5354, 65535)])));
        assert_eq!(c.to_string(), "SCTP 1-65535,TCP 1-65535,UDP 1-5352,5354-65535");
    }

    fn arb_ranges() -> impl Strategy<Value = PortRanges> {
        proptest::collection::vec((1u16..=65535, 0u16..2000), 0..6).prop_map(|v| {
            v.into_iter()
                .fold(PortRanges::empty(), |acc, (a, len)| acc.union(&PortRanges::range(a, a.saturating_add(len))))
        })
    }

    proptest! {
        #[test]
        fn set_algebra_agrees_with_membership(a in arb_ranges(), b in arb_ranges(), p in 1u16..=65535) {
            prop_assert_eq!(a.union(&b).contains(p), a.contains(p) || b.contains(p));
            prop_assert_eq!(a.intersect(&b).contains(p), a.contains(p) && b.contains(p));
            prop_assert_eq!(a.subtract(&b).contains(p), a.contains(p) && !b.contains(p));
            prop_assert_eq!(a.complement().contains(p), !a.contains(p));
        }
    }
}
