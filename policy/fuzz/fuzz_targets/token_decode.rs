//! Token decoders on arbitrary input: never panic, and whatever decodes is canonical (sealing
//! its claims again gives back the same signed bytes).

#![no_main]

use keyway_policy::auth::{WorkloadKey, decode_token, decode_token_bytes};
use libfuzzer_sys::fuzz_target;

/// The key the seed corpus is sealed with (`seeds.py`), so valid seeds reach the success path.
const KEY: WorkloadKey = WorkloadKey::from_bytes([7; 32]);

fuzz_target!(|data: &[u8]| {
    if let Ok(token) = decode_token_bytes(data) {
        let claims = *token.claims();
        let resealed = claims.seal_bytes(&KEY);
        assert_eq!(resealed.len(), data.len());
        assert_eq!(resealed.get(..60), data.get(..60), "token encoding is not canonical");
        if let Ok(verified) = token.verify(&KEY, claims.issued_at_ms, 0) {
            assert_eq!(verified, claims);
            assert_eq!(resealed, data, "a verified token must be the one we seal");
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(token) = decode_token(text) {
            let claims = *token.claims();
            if token.verify(&KEY, claims.issued_at_ms, 0).is_ok() {
                assert_eq!(claims.seal(&KEY), text, "a verified token must be the one we seal");
            }
        }
    }
});
