//! Addresses as one number space: IPv4 is mapped into IPv6 (`::ffff:a.b.c.d`), so one interval
//! type covers both families. CIDRs, `ipBlock` sets (cidr minus except) and the partition of the
//! IPv4 space into the elementary ranges that the connectivity list prints.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// An address in the unified space.
pub type Addr = u128;

/// The first IPv4 address (`0.0.0.0`) in the unified space.
pub const V4_FIRST: Addr = 0xffff_0000_0000;
/// The last IPv4 address (`255.255.255.255`) in the unified space.
pub const V4_LAST: Addr = 0xffff_ffff_ffff;

/// An address as a number (IPv4 v4-mapped).
pub fn addr(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v4) => V4_FIRST | Addr::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// The address for a number: v4-mapped numbers are IPv4.
pub fn ip(a: Addr) -> IpAddr {
    if (V4_FIRST..=V4_LAST).contains(&a) {
        IpAddr::V4(Ipv4Addr::from((a & 0xffff_ffff) as u32))
    } else {
        IpAddr::V6(Ipv6Addr::from(a))
    }
}

/// An inclusive interval of addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Range {
    /// First address.
    pub first: Addr,
    /// Last address.
    pub last: Addr,
}

impl Range {
    /// Whether the range is within the IPv4 space.
    pub fn is_v4(&self) -> bool {
        self.first >= V4_FIRST && self.last <= V4_LAST
    }
}

impl std::fmt::Display for Range {
    /// `first-last`, as the connectivity list prints ranges.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", ip(self.first), ip(self.last))
    }
}

/// A parsed CIDR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    /// The range it covers (host bits cleared, as `net.ParseCIDR` does).
    pub range: Range,
    /// Whether it was written as IPv4.
    pub v4: bool,
}

/// Parses `a.b.c.d/n` or `x::y/n`. Host bits are allowed and cleared.
pub fn parse_cidr(s: &str) -> Result<Cidr, String> {
    let Some((a, p)) = s.split_once('/') else {
        return Err(format!("{s:?} is not a CIDR: expected ADDRESS/PREFIX-LENGTH, e.g. 10.0.0.0/16"));
    };
    let address: IpAddr = a.parse().map_err(|_| format!("{s:?} is not a CIDR: {a:?} is not an IP address"))?;
    let max = if address.is_ipv4() { 32 } else { 128 };
    let len: u32 = match p.parse::<u32>() {
        Ok(n) if n <= max && !p.starts_with('+') && !(p.len() > 1 && p.starts_with('0')) => n,
        _ => return Err(format!("{s:?} is not a CIDR: prefix length {p:?} must be 0..={max}")),
    };
    let host_bits = max - len;
    let base = addr(address);
    let mask: Addr = if host_bits == 0 { 0 } else { (1u128 << host_bits) - 1 };
    let first = base & !mask;
    Ok(Cidr { range: Range { first, last: first | mask }, v4: address.is_ipv4() })
}

/// A sorted set of disjoint, non-adjacent address ranges.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct IpSet(Vec<Range>);

impl IpSet {
    /// The empty set.
    pub fn empty() -> IpSet {
        IpSet(Vec::new())
    }

    /// One range.
    pub fn from_range(r: Range) -> IpSet {
        IpSet(vec![r])
    }

    /// A set from sorted, disjoint, non-adjacent ranges.
    pub(crate) fn from_sorted(ranges: Vec<Range>) -> IpSet {
        IpSet(ranges)
    }

    /// The ranges.
    pub fn ranges(&self) -> &[Range] {
        &self.0
    }

    /// Whether the set holds `a`.
    pub fn contains(&self, a: Addr) -> bool {
        let i = self.0.partition_point(|r| r.last < a);
        self.0.get(i).is_some_and(|r| r.first <= a)
    }

    /// The addresses of `self` not in `r`.
    pub fn subtract_range(&self, r: Range) -> IpSet {
        let mut out = Vec::with_capacity(self.0.len() + 1);
        for &x in &self.0 {
            if x.last < r.first || x.first > r.last {
                out.push(x);
                continue;
            }
            if x.first < r.first {
                out.push(Range { first: x.first, last: r.first - 1 });
            }
            if x.last > r.last {
                out.push(Range { first: r.last + 1, last: x.last });
            }
        }
        IpSet(out)
    }
}

/// The elementary intervals of the IPv4 space cut at the start and at the end + 1 of every given
/// IPv4 range (ranges outside IPv4 are left out). `0.0.0.0/0` is always a cut set, so the result
/// covers the whole IPv4 space.
pub fn v4_partition<'a>(ranges: impl IntoIterator<Item = &'a Range>) -> Vec<Range> {
    let mut cuts: Vec<Addr> = vec![V4_FIRST];
    for r in ranges {
        if !r.is_v4() {
            continue;
        }
        cuts.push(r.first);
        if r.last < V4_LAST {
            cuts.push(r.last + 1);
        }
    }
    cuts.sort_unstable();
    cuts.dedup();
    let mut out = Vec::with_capacity(cuts.len());
    for (i, &c) in cuts.iter().enumerate() {
        let last = cuts.get(i + 1).map_or(V4_LAST, |n| n - 1);
        out.push(Range { first: c, last });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs() {
        let c = parse_cidr("10.0.0.0/8").unwrap();
        assert_eq!(c.range.to_string(), "10.0.0.0-10.255.255.255");
        assert_eq!(parse_cidr("10.1.2.3/16").unwrap().range.to_string(), "10.1.0.0-10.1.255.255");
        assert_eq!(parse_cidr("0.0.0.0/0").unwrap().range.to_string(), "0.0.0.0-255.255.255.255");
        assert_eq!(parse_cidr("1.2.3.4/32").unwrap().range.to_string(), "1.2.3.4-1.2.3.4");
        assert!(!parse_cidr("2001:db8::/32").unwrap().v4);
        for bad in ["10.0.0.0", "10.0.0.0/33", "10.0.0/8", "x/8", "10.0.0.0/-1", "10.0.0.0/+8", "::/129", ""] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn except_and_partition() {
        let c = parse_cidr("10.0.0.0/8").unwrap().range;
        let e = parse_cidr("10.1.0.0/16").unwrap().range;
        let s = IpSet::from_range(c).subtract_range(e);
        assert_eq!(s.ranges().len(), 2);
        assert!(s.contains(addr("10.0.0.1".parse().unwrap())));
        assert!(!s.contains(addr("10.1.0.1".parse().unwrap())));
        let p = v4_partition(s.ranges());
        let printed: Vec<String> = p.iter().map(ToString::to_string).collect();
        assert_eq!(
            printed,
            [
                "0.0.0.0-9.255.255.255",
                "10.0.0.0-10.0.255.255",
                "10.1.0.0-10.1.255.255",
                "10.2.0.0-10.255.255.255",
                "11.0.0.0-255.255.255.255"
            ]
        );
    }
}
