//! Flow header and status decoders on arbitrary input: never panic, and whatever decodes is
//! canonical (encoding the decoded header gives back the same bytes).

#![no_main]

use keyway_policy::flow::{FlowHeader, Status};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = FlowHeader::decode(data) {
        assert_eq!(h.encode(), data, "flow header encoding is not canonical");
    }
    if let Some(prefix) = data.get(..6).and_then(|p| <[u8; 6]>::try_from(p).ok()) {
        let _ = FlowHeader::body_len(&prefix);
        if let Ok((code, n)) = Status::decode_prefix(&prefix)
            && let Some(reason) = data.get(6..6 + n)
            && let Ok(reason) = std::str::from_utf8(reason)
        {
            let s = Status { code, reason: reason.to_owned() };
            assert_eq!(s.encode(), data.get(..6 + n).unwrap_or_default());
        }
    }
});
