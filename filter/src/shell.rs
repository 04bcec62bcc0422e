//! The proxy-wasm shell (wasm32 only): the root context parses the configuration, holds the keys
//! and refreshes them; the stream and HTTP contexts read properties, call [`crate::verdict`] and
//! act. Host calls go through the SDK's `hostcalls`, whose errors are handled (the trait helpers
//! would unwrap them).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use chacha20::ChaCha20Rng;
use chacha20::rand_core::{Rng as _, SeedableRng as _};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext, StreamContext};
use proxy_wasm::types::{BufferType, ContextType, LogLevel, MapType, MetricType};

use crate::config::{self, KeySource, Mode, Settings};
use crate::identity::{self, Identity, NodeMetadata, OVERLAY_IPS_ANNOTATION};
use crate::keystate::{self, KeyState, RefreshOutcome};
use crate::metrics;
use crate::replay::{SharedReplay, Store, StoreError};
use crate::verdict::{self, Denial, Exemptions, TunnelCheck};

mod stream;
mod tunnel;

/// How often a root context with a key service looks at its refresh schedule (and flushes its
/// allowed-connection counts).
const TICK: Duration = Duration::from_millis(200);

/// How often a root context without a key service flushes its allowed-connection counts.
const FLUSH_TICK: Duration = Duration::from_secs(1);

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { state: None }) });
}}

/// What every context of one plugin instance shares (one per VM, that is per worker thread).
/// The ticket replay set is not here: it lives in the host's shared data, one for every worker.
struct State {
    settings: Settings,
    identity: Option<Identity>,
    keys: KeyState,
    replay: Option<SharedReplay>,
    exemptions: Exemptions,
    metrics: Metrics,
}

type Shared = Rc<RefCell<State>>;

struct Root {
    state: Option<Shared>,
}

impl Context for Root {
    fn on_done(&mut self) -> bool {
        if let Some(state) = &self.state {
            state.borrow_mut().metrics.flush();
        }
        true
    }

    fn on_http_call_response(&mut self, token: u32, _headers: usize, body_size: usize, _trailers: usize) {
        let Some(state) = &self.state else { return };
        let mut s = state.borrow_mut();
        if !s.keys.is_in_flight(token) {
            return;
        }
        let now = now_ms();
        let status = hostcalls::get_map_value(MapType::HttpCallResponseHeaders, ":status").ok().flatten();
        let body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size).ok().flatten();
        let Some(identity) = s.identity.clone() else { return };
        match keystate::check_response(status.as_deref(), body.as_deref(), &identity, s.settings.identity.as_deref()) {
            Ok(bundle) => {
                let before = s.keys.epochs(now);
                s.keys.fetched(bundle, now);
                let after = s.keys.epochs(now);
                if before != after {
                    log(
                        LogLevel::Info,
                        &format!(
                            "keyway {}: keys refreshed: workload key epochs {:?}, ticket key epochs {:?}",
                            s.settings.mode.as_str(),
                            after.0,
                            after.1
                        ),
                    );
                }
                s.metrics.refresh(RefreshOutcome::Ok);
            }
            Err((outcome, message)) => {
                s.keys.fetch_failed(now);
                s.metrics.refresh(outcome);
                if s.keys.log_failure() {
                    let (mode, n) = (s.settings.mode.as_str(), s.keys.failures());
                    log(LogLevel::Warn, &format!("keyway {mode}: key refresh failed ({n} in a row): {message}"));
                }
            }
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX).ok().flatten();
        let settings = match config::parse(bytes.as_deref().unwrap_or_default()) {
            Ok(s) => s,
            Err(e) => {
                log(LogLevel::Error, &format!("keyway: {e}; the filter refuses to start"));
                return false;
            }
        };
        let meta = node_metadata();
        let identity = match (settings.mode, identity::resolve(&settings, &meta)) {
            (_, Ok(id)) => Some(id),
            (Mode::InboundPlain, Err(_)) => None,
            (mode, Err(e)) => {
                log(LogLevel::Error, &format!("keyway {}: {e}; the filter refuses to start", mode.as_str()));
                return false;
            }
        };
        let keys = match &settings.keys {
            KeySource::Static(bundle) => KeyState::fixed(bundle.as_ref().clone()),
            KeySource::Service(ks) => KeyState::from_service(ks),
            KeySource::None => KeyState::fixed(empty_bundle(&identity)),
        };
        let replay = match (&identity, settings.mode) {
            (Some(id), Mode::InboundTunnel) if settings.replay_cache_capacity > 0 => Some(SharedReplay::new(
                id.overlay_ip,
                settings.replay_cache_capacity,
                settings.replay_cache_per_source,
                settings.window_ms,
            )),
            _ => None,
        };
        let exemptions = Exemptions { ports: settings.exempt_ports.clone(), cidrs: settings.exempt_cidrs.clone() };
        let metrics = Metrics::define(settings.mode);
        log(LogLevel::Info, &summary(&settings, identity.as_ref(), &keys));
        if settings.fail_open && settings.mode != Mode::Outbound {
            let mode = settings.mode.as_str();
            log(LogLevel::Warn, &format!("keyway {mode}: fail_open has no effect in this mode: what fails is refused"));
        }
        let tick = if matches!(settings.keys, KeySource::Service(_)) { TICK } else { FLUSH_TICK };
        if hostcalls::set_tick_period(tick).is_err() {
            log(LogLevel::Error, "keyway: cannot set the tick period; keys would never be fetched nor counts flushed");
            return false;
        }
        if let Some(old) = &self.state {
            old.borrow_mut().metrics.flush();
        }
        self.state = Some(Rc::new(RefCell::new(State { settings, identity, keys, replay, exemptions, metrics })));
        true
    }

    fn on_tick(&mut self) {
        let Some(state) = &self.state else { return };
        let mut s = state.borrow_mut();
        s.metrics.flush();
        let now = now_ms();
        if !s.keys.fetch_due(now) {
            return;
        }
        let (KeySource::Service(ks), Some(identity)) = (&s.settings.keys, &s.identity) else { return };
        let headers = keystate::request_headers(ks, identity.overlay_ip);
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let timeout = Duration::from_millis(ks.timeout_ms);
        match hostcalls::dispatch_http_call(&ks.cluster, headers, None, Vec::new(), timeout) {
            Ok(token) => s.keys.fetch_started(token),
            Err(status) => {
                let message = format!(
                    "keyway {}: cannot call the key service through cluster {:?} ({status:?}); check that the \
                     cluster exists",
                    s.settings.mode.as_str(),
                    ks.cluster
                );
                s.keys.fetch_failed(now);
                s.metrics.refresh(RefreshOutcome::DispatchFailed);
                if s.keys.log_failure() {
                    log(LogLevel::Warn, &message);
                }
            }
        }
    }

    fn create_stream_context(&self, _id: u32) -> Option<Box<dyn StreamContext>> {
        let state = self.state.clone()?;
        Some(Box::new(stream::Connection { state }))
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        let state = self.state.clone()?;
        Some(Box::new(tunnel::Tunnel { state }))
    }

    fn get_type(&self) -> Option<ContextType> {
        match self.state.as_ref().map(|s| s.borrow().settings.mode) {
            Some(Mode::InboundTunnel) => Some(ContextType::HttpContext),
            _ => Some(ContextType::StreamContext),
        }
    }
}

/// The metric ids of one plugin instance.
struct Metrics {
    mode: Mode,
    /// By verdict: allow, deny, fail_open.
    connections: [Option<u32>; 3],
    /// Allowed connections not yet added to their counter: they are added at every tick (and
    /// when the plugin stops), one host call for many connections; refusals are counted at once.
    allowed: u64,
    denials: BTreeMap<&'static str, u32>,
    refreshes: BTreeMap<&'static str, u32>,
}

impl Metrics {
    fn define(mode: Mode) -> Self {
        let define = |name: &str| hostcalls::define_metric(MetricType::Counter, name).ok();
        let connections = metrics::VERDICTS.map(|v| define(&metrics::connections(mode, v)));
        let denials = verdict::ALL_REASONS.iter().filter_map(|r| Some((*r, define(&metrics::denials(r))?))).collect();
        let refreshes = if mode == Mode::InboundPlain {
            BTreeMap::new()
        } else {
            RefreshOutcome::ALL
                .iter()
                .filter_map(|o| Some((o.as_str(), define(&metrics::key_refreshes(*o))?)))
                .collect()
        };
        Metrics { mode, connections, denials, refreshes, allowed: 0 }
    }

    /// Counts an allowed connection (added to the counter at the next [`Metrics::flush`]).
    fn allowed(&mut self) {
        self.allowed = self.allowed.saturating_add(1);
    }

    /// Adds the allowed connections counted since the last flush to their counter.
    fn flush(&mut self) {
        if self.allowed > 0
            && let Some(id) = self.connection_id("allow")
        {
            let _ = hostcalls::increment_metric(id, i64::try_from(self.allowed).unwrap_or(i64::MAX));
            self.allowed = 0;
        }
    }

    /// The counter of connections with `verdict`.
    fn connection_id(&self, verdict: &str) -> Option<u32> {
        let index = metrics::VERDICTS.iter().position(|v| *v == verdict)?;
        self.connections.get(index).copied().flatten()
    }

    fn connection(&self, verdict: &str) {
        if let Some(id) = self.connection_id(verdict) {
            let _ = hostcalls::increment_metric(id, 1);
        }
    }

    fn denial(&mut self, reason: &'static str) {
        let id = match self.denials.get(reason) {
            Some(id) => Some(*id),
            None => {
                let id = hostcalls::define_metric(MetricType::Counter, &metrics::denials(reason)).ok();
                if let Some(id) = id {
                    self.denials.insert(reason, id);
                }
                id
            }
        };
        if let Some(id) = id {
            let _ = hostcalls::increment_metric(id, 1);
        }
    }

    fn refresh(&self, outcome: RefreshOutcome) {
        if let Some(id) = self.refreshes.get(outcome.as_str()) {
            let _ = hostcalls::increment_metric(*id, 1);
        }
    }

    /// Counts a refusal and logs it; `fail_open` ones are logged as warnings every time.
    fn refused(&mut self, denial: &Denial, fail_open: bool, context: &str) {
        let mode = self.mode.as_str();
        if fail_open {
            self.connection("fail_open");
            log(
                LogLevel::Warn,
                &format!("keyway {mode}: fail-open: letting {context} through: {} ({})", denial.reason, denial.detail),
            );
        } else {
            self.connection("deny");
            self.denial(denial.reason);
            let level = if self.mode == Mode::InboundPlain { LogLevel::Debug } else { LogLevel::Info };
            log(level, &format!("keyway {mode}: refused {context}: {} ({})", denial.reason, denial.detail));
        }
    }
}

/// The effective configuration, without key material, for the start-up log.
fn summary(s: &Settings, identity: Option<&Identity>, keys: &KeyState) -> String {
    let source = match &s.keys {
        KeySource::None => "none".to_owned(),
        KeySource::Static(_) => {
            let (w, t) = keys.epochs(now_ms());
            format!("static (workload key epochs {w:?}, ticket key epochs {t:?})")
        }
        KeySource::Service(ks) => format!("key service via cluster {:?} {}", ks.cluster, ks.path),
    };
    format!(
        "keyway {}: started: identity {:?}, overlay ip {:?}, keys {source}, window {} ms, replay set {} per \
         envoy ({} per source), exempt ports {:?}, exempt cidrs {}, fail_open {}",
        s.mode.as_str(),
        identity.and_then(|i| i.spiffe.as_deref()),
        identity.map(|i| i.overlay_ip),
        s.window_ms,
        s.replay_cache_capacity,
        s.replay_cache_per_source,
        s.exempt_ports,
        s.exempt_cidrs.len(),
        s.fail_open
    )
}

/// A bundle with no keys, for the mode that needs none.
fn empty_bundle(identity: &Option<Identity>) -> keyway_policy::keyservice::KeyBundle {
    keyway_policy::keyservice::KeyBundle {
        identity: String::new(),
        overlay_ip: identity.as_ref().map_or(std::net::IpAddr::from([0, 0, 0, 0]), |i| i.overlay_ip),
        zone: String::new(),
        workload_keys: Vec::new(),
        ticket_keys: Vec::new(),
        refresh_ms: keyway_policy::keyservice::DEFAULT_REFRESH_MS,
    }
}

fn node_metadata() -> NodeMetadata {
    // Envoy 1.40 serves the node as `xds.node`; older proxies (and some Istio builds) as `node`.
    let text = |field: &str, key: Option<&str>| {
        ["xds.node", "node"].iter().find_map(|root| {
            let mut path: Vec<&str> = root.split('.').collect();
            path.extend(["metadata", field]);
            path.extend(key);
            property(path).and_then(|b| String::from_utf8(b).ok()).filter(|s| !s.is_empty())
        })
    };
    NodeMetadata {
        namespace: text("NAMESPACE", None),
        service_account: text("SERVICE_ACCOUNT", None),
        overlay_ips_annotation: text("ANNOTATIONS", Some(OVERLAY_IPS_ANNOTATION)),
        instance_ips: text("INSTANCE_IPS", None),
    }
}

/// A property, when the host has it.
fn property(path: Vec<&str>) -> Option<Vec<u8>> {
    hostcalls::get_property(path).ok().flatten()
}

thread_local! {
    /// The nonce generator of this VM (one VM per worker thread; every plugin of the VM draws from
    /// it): ChaCha20 seeded with 32 bytes of the host's random source (WASI `random_get`) at the
    /// first draw, so a connection costs no host call for its nonce. The first draw comes from a
    /// connection, after Envoy instantiated the worker's VM, so no two VMs share a seed.
    static NONCES: RefCell<Option<ChaCha20Rng>> = const { RefCell::new(None) };
}

/// A fresh nonce, or `None` when the host has never given randomness to seed from (the draw is
/// tried again at the next connection; meanwhile tokens are refused as `no-randomness`).
fn nonce<const N: usize>() -> Option<[u8; N]> {
    NONCES.with(|cell| {
        let mut rng = cell.borrow_mut();
        if rng.is_none() {
            let mut seed = [0u8; 32];
            getrandom::fill(&mut seed).ok()?;
            *rng = Some(ChaCha20Rng::from_seed(seed));
        }
        let mut out = [0u8; N];
        rng.as_mut()?.fill_bytes(&mut out);
        Some(out)
    })
}

/// The host's clock in unix ms (0 when it cannot be read: every credential then fails its window).
fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn log(level: LogLevel, message: &str) {
    let _ = hostcalls::log(level, message);
}

/// Builds the tunnel check of a state.
fn tunnel_check(s: &State) -> Option<TunnelCheck> {
    let identity = s.identity.as_ref()?;
    Some(TunnelCheck {
        overlay_ip: identity.overlay_ip,
        window_ms: s.settings.window_ms,
        fail_open: s.settings.fail_open,
    })
}

/// The host's shared data (one store per Envoy process and `vm_id`, every worker's VM sees it).
struct HostStore;

impl Store for HostStore {
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), StoreError> {
        hostcalls::get_shared_data(key).map_err(|status| StoreError {
            op: "get",
            key: key.to_owned(),
            detail: format!("{status:?}"),
        })
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, StoreError> {
        match hostcalls::set_shared_data(key, Some(value), cas) {
            Ok(()) => Ok(true),
            Err(proxy_wasm::types::Status::CasMismatch) => Ok(false),
            Err(status) => Err(StoreError { op: "set", key: key.to_owned(), detail: format!("{status:?}") }),
        }
    }
}
