//! A fake Kubernetes API server on loopback for the tests: lists, watches (newline-delimited
//! JSON events, replayed from the requested `resourceVersion`), `410 Gone` for a compacted
//! history, `404 page not found` for a resource it does not serve (a CRD that is not installed),
//! and get/create/replace of ConfigMaps with `resourceVersion` preconditions. Every request is
//! logged (`METHOD path`).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// The resources the fake serves by list/watch path.
pub(super) const NAMESPACES: &str = "/api/v1/namespaces";
pub(super) const PODS: &str = "/api/v1/pods";
pub(super) const NETWORK_POLICIES: &str = "/apis/networking.k8s.io/v1/networkpolicies";
pub(super) const ADMIN: &str = "/apis/policy.networking.k8s.io/v1alpha1/adminnetworkpolicies";
pub(super) const BASELINE: &str = "/apis/policy.networking.k8s.io/v1alpha1/baselineadminnetworkpolicies";
pub(super) const WORKLOAD_ENTRIES: &str = "/apis/networking.istio.io/v1/workloadentries";
const CONFIGMAPS: &str = "/api/v1/namespaces/keyway-system/configmaps";

#[derive(Debug, Default)]
struct Resource {
    served: bool,
    list_kind: &'static str,
    api_version: &'static str,
    objects: BTreeMap<String, Value>,
    /// Events with their resource versions, for watches that resume.
    log: Vec<(u64, Bytes)>,
    /// Watches started at or below this version get `410 Gone`.
    compacted: u64,
    watchers: Vec<mpsc::UnboundedSender<Bytes>>,
}

#[derive(Debug, Default)]
struct Inner {
    rv: u64,
    resources: BTreeMap<&'static str, Resource>,
    configmaps: BTreeMap<String, Value>,
    requests: Vec<String>,
}

/// The fake API server.
#[derive(Debug)]
pub(super) struct FakeApi {
    pub(super) addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn key(obj: &Value) -> String {
    let name = obj.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default();
    match obj.pointer("/metadata/namespace").and_then(Value::as_str) {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_owned(),
    }
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

impl FakeApi {
    /// Starts serving; `crds`: whether AdminNetworkPolicy, BaselineAdminNetworkPolicy and
    /// WorkloadEntry exist.
    pub(super) async fn start(crds: bool) -> FakeApi {
        let mut inner = Inner { rv: 1, ..Inner::default() };
        for (path, served, list_kind, api_version) in [
            (NAMESPACES, true, "NamespaceList", "v1"),
            (PODS, true, "PodList", "v1"),
            (NETWORK_POLICIES, true, "NetworkPolicyList", "networking.k8s.io/v1"),
            (ADMIN, crds, "AdminNetworkPolicyList", "policy.networking.k8s.io/v1alpha1"),
            (BASELINE, crds, "BaselineAdminNetworkPolicyList", "policy.networking.k8s.io/v1alpha1"),
            (WORKLOAD_ENTRIES, crds, "WorkloadEntryList", "networking.istio.io/v1"),
        ] {
            inner.resources.insert(path, Resource { served, list_kind, api_version, ..Resource::default() });
        }
        let inner = Arc::new(Mutex::new(inner));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = inner.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let shared = shared.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(handle(&shared, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        FakeApi { addr, inner, task }
    }

    /// A kube client for this server.
    pub(super) fn client(&self) -> kube::Client {
        let uri: http::Uri = format!("http://{}", self.addr).parse().unwrap();
        let config = kube::Config::new(uri);
        kube::Client::try_from(config).unwrap()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap()
    }

    fn event(&self, path: &'static str, ty: &str, mut obj: Value, silent: bool) {
        let mut g = self.lock();
        g.rv += 1;
        let rv = g.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let r = g.resources.get_mut(path).unwrap();
        let k = key(&obj);
        if ty == "DELETED" {
            r.objects.remove(&k);
        } else {
            r.objects.insert(k, obj.clone());
        }
        if silent {
            return;
        }
        let line = Bytes::from(format!("{}\n", json!({"type": ty, "object": obj})));
        r.log.push((rv, line.clone()));
        r.watchers.retain(|w| w.send(line.clone()).is_ok());
    }

    /// Creates or replaces an object, with a watch event.
    pub(super) fn apply(&self, path: &'static str, obj: Value) {
        let k = key(&obj);
        let exists = self.lock().resources[path].objects.contains_key(&k);
        self.event(path, if exists { "MODIFIED" } else { "ADDED" }, obj, false);
    }

    /// Deletes an object, with a watch event.
    pub(super) fn delete(&self, path: &'static str, key: &str) {
        let obj = self.lock().resources[path].objects.get(key).cloned().unwrap();
        self.event(path, "DELETED", obj, false);
    }

    /// Deletes an object without telling the watchers (as if the event was lost).
    pub(super) fn delete_silently(&self, path: &'static str, key: &str) {
        let obj = self.lock().resources[path].objects.get(key).cloned().unwrap();
        self.event(path, "DELETED", obj, true);
    }

    /// Compacts the history: open watches of `path` get `410 Gone` and close; resuming fails
    /// the same way, so the client must list again.
    pub(super) fn expire(&self, path: &'static str) {
        let mut g = self.lock();
        let rv = g.rv;
        let r = g.resources.get_mut(path).unwrap();
        r.compacted = rv;
        r.log.clear();
        let gone = Bytes::from(format!(
            "{}\n",
            json!({"type": "ERROR", "object": status(410, "Expired", "too old resource version")})
        ));
        for w in r.watchers.drain(..) {
            let _ = w.send(gone.clone());
        }
    }

    /// The ConfigMap `keyway-system/name`'s data.
    pub(super) fn configmap_data(&self, name: &str) -> Option<BTreeMap<String, String>> {
        let cm = self.lock().configmaps.get(name).cloned()?;
        serde_json::from_value(cm.get("data").cloned().unwrap_or(json!({}))).ok()
    }

    /// Seeds the ConfigMap `keyway-system/name`.
    pub(super) fn set_configmap(&self, name: &str, data: Value) {
        let mut g = self.lock();
        g.rv += 1;
        let cm = json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": "keyway-system", "resourceVersion": g.rv.to_string()},
            "data": data});
        g.configmaps.insert(name.to_owned(), cm);
    }

    /// The requests so far (`GET /api/v1/pods?…`).
    pub(super) fn requests(&self) -> Vec<String> {
        self.lock().requests.clone()
    }
}

/// A body that is either whole or a stream of chunks.
enum FakeBody {
    Full(Option<Bytes>),
    Stream(mpsc::UnboundedReceiver<Bytes>),
}

impl Body for FakeBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            FakeBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            FakeBody::Stream(rx) => rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b)))),
        }
    }
}

fn reply(code: StatusCode, body: &Value) -> Response<FakeBody> {
    let mut r = Response::new(FakeBody::Full(Some(Bytes::from(body.to_string()))));
    *r.status_mut() = code;
    r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    r
}

fn query(req: &Request<Incoming>, name: &str) -> Option<String> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then(|| v.to_owned())
    })
}

async fn handle(shared: &Arc<Mutex<Inner>>, req: Request<Incoming>) -> Response<FakeBody> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    shared.lock().unwrap().requests.push(format!("{method} {}", req.uri()));
    if path.starts_with(CONFIGMAPS) {
        let name = path.strip_prefix(CONFIGMAPS).unwrap_or_default().trim_start_matches('/').to_owned();
        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        return configmap(shared, &method, &name, &body);
    }
    let watch = query(&req, "watch").as_deref() == Some("true") || query(&req, "watch").as_deref() == Some("1");
    let from: u64 = query(&req, "resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
    let mut g = shared.lock().unwrap();
    let rv = g.rv;
    let Some(r) = g.resources.get_mut(path.as_str()) else {
        return reply(
            StatusCode::NOT_FOUND,
            &status(404, "NotFound", "the server could not find the requested resource"),
        );
    };
    if !r.served {
        // What an API server answers for a group/version it does not serve: plain text.
        let mut resp = Response::new(FakeBody::Full(Some(Bytes::from_static(b"404 page not found\n"))));
        *resp.status_mut() = StatusCode::NOT_FOUND;
        return resp;
    }
    if !watch {
        let items: Vec<Value> = r.objects.values().cloned().collect();
        let list = json!({"apiVersion": r.api_version, "kind": r.list_kind,
            "metadata": {"resourceVersion": rv.to_string()}, "items": items});
        return reply(StatusCode::OK, &list);
    }
    let (tx, rx) = mpsc::unbounded_channel();
    if from < r.compacted {
        let gone = json!({"type": "ERROR", "object": status(410, "Expired", "too old resource version")});
        let _ = tx.send(Bytes::from(format!("{gone}\n")));
        // Dropping `tx` ends the stream after the error, as the API server does.
    } else {
        for (v, line) in &r.log {
            if *v > from {
                let _ = tx.send(line.clone());
            }
        }
        r.watchers.push(tx);
    }
    let mut resp = Response::new(FakeBody::Stream(rx));
    resp.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    resp
}

fn configmap(shared: &Arc<Mutex<Inner>>, method: &http::Method, name: &str, body: &[u8]) -> Response<FakeBody> {
    let mut g = shared.lock().unwrap();
    match *method {
        http::Method::GET => match g.configmaps.get(name) {
            Some(cm) => reply(StatusCode::OK, cm),
            None => reply(StatusCode::NOT_FOUND, &status(404, "NotFound", &format!("configmaps \"{name}\" not found"))),
        },
        http::Method::POST => {
            let mut cm: Value = serde_json::from_slice(body).unwrap_or(json!({}));
            let name = cm.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default().to_owned();
            if g.configmaps.contains_key(&name) {
                return reply(StatusCode::CONFLICT, &status(409, "AlreadyExists", "already exists"));
            }
            g.rv += 1;
            cm["metadata"]["resourceVersion"] = json!(g.rv.to_string());
            g.configmaps.insert(name, cm.clone());
            reply(StatusCode::CREATED, &cm)
        }
        http::Method::PUT => {
            let mut cm: Value = serde_json::from_slice(body).unwrap_or(json!({}));
            let current = g.configmaps.get(name).and_then(|c| c.pointer("/metadata/resourceVersion").cloned());
            if current.is_none() {
                return reply(StatusCode::NOT_FOUND, &status(404, "NotFound", "not found"));
            }
            if cm.pointer("/metadata/resourceVersion") != current.as_ref() {
                return reply(StatusCode::CONFLICT, &status(409, "Conflict", "the object has been modified"));
            }
            g.rv += 1;
            cm["metadata"]["resourceVersion"] = json!(g.rv.to_string());
            g.configmaps.insert(name.to_owned(), cm.clone());
            reply(StatusCode::OK, &cm)
        }
        _ => reply(StatusCode::METHOD_NOT_ALLOWED, &status(405, "MethodNotAllowed", "no")),
    }
}
