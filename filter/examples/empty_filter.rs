//! The empty proxy-wasm network filter: the baseline of the connections bench
//! (`benches/connections.rs`, variant `empty_wasm`).
//!
//! Built like the keyway module (`make wasm`: `cargo build -p keyway-filter --target wasm32-wasip1
//! --profile wasm-release --example empty_filter`, giving
//! `target/wasm32-wasip1/wasm-release/examples/empty_filter.wasm`) and loaded into the same Envoy
//! with the same runtime (V8) and the same SDK: a root context and one stream context per
//! connection that does nothing and lets every connection through. What keyway costs beyond it is
//! keyway's own per-connection work; what it costs over no filter at all is Envoy's wasm plumbing.
//!
//! On the host this example is an empty library (the SDK is a wasm32-only dependency).

#[cfg(target_arch = "wasm32")]
mod module {
    use proxy_wasm::traits::{Context, RootContext, StreamContext};
    use proxy_wasm::types::ContextType;

    proxy_wasm::main! {{
        proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root) });
    }}

    struct Root;

    impl Context for Root {}

    impl RootContext for Root {
        fn create_stream_context(&self, _id: u32) -> Option<Box<dyn StreamContext>> {
            Some(Box::new(Connection))
        }

        fn get_type(&self) -> Option<ContextType> {
            Some(ContextType::StreamContext)
        }
    }

    /// One connection: every callback keeps the SDK's default (continue).
    struct Connection;

    impl Context for Connection {}

    impl StreamContext for Connection {}
}
