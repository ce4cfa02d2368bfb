//! The agent's API listener (`--api-addr`, default `0.0.0.0:9872`): HTTPS with a self-signed
//! serving certificate kept in the state dir, serving `/flows` (the live flow table, or the flow
//! history with `?since=`) and `/status`. Like the kubelet's delegated authn/authz, every request
//! is authenticated — a client certificate signed by `--client-ca-file` (the API server's kubelet
//! client identity, where a front proxy or the kubelet port is used), else a bearer token in
//! `Authorization` or, through the API server's node proxy (which strips `Authorization`), in
//! `X-Wiremesh-Authorization`, checked with a TokenReview — and authorised with a
//! SubjectAccessReview for `nodes/proxy` on this node. Nothing here is served without both;
//! `/metrics` and the probes stay on the metrics listener ([`crate::admin`]).
//!
//! Reached by meshctl through the API server: `/api/v1/nodes/https:<node>:9872/proxy/flows`.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use axum::{
    Extension, Router,
    extract::{Query, Request, State},
    http::{StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};
use futures::future::BoxFuture;
use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
};
use kube::{Api, api::PostParams};
use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    server::WebPkiClientVerifier,
};
use serde::{Deserialize, Serialize};
use tokio::{net::TcpListener, task::JoinSet};
use tokio_rustls::TlsAcceptor;

use crate::{
    drain::Drain,
    flows::unix_now,
    flowsource::FlowSource,
    history::Period,
    metrics::{ApiLabels, Metrics},
    status::SharedStatus,
};

/// File names of the serving certificate and key under the state dir.
pub const CERT_FILE: &str = "api-tls.crt";
pub const KEY_FILE: &str = "api-tls.key";

/// The header meshctl sends the caller's bearer token in: the API server's node proxy removes
/// `Authorization` after authenticating the caller, and passes other headers on.
pub const TOKEN_HEADER: &str = "x-wiremesh-authorization";

/// Time a client gets to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the API listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("bind API listener on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("serving certificate {path}: {source}")]
    CertFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("serving certificate {path}: {problem}")]
    CertInvalid { path: PathBuf, problem: String },
    #[error("generate the serving certificate: {0}")]
    Generate(#[source] rcgen::Error),
    #[error("client CA file {path}: {problem}")]
    ClientCa { path: PathBuf, problem: String },
    #[error("TLS configuration: {0}")]
    Tls(#[source] rustls::Error),
}

/// An authenticated user, as Kubernetes names one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub username: String,
    #[serde(default)]
    pub uid: String,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    pub extra: BTreeMap<String, Vec<String>>,
}

/// TokenReview and SubjectAccessReview, behind a trait so the listener is testable without an
/// API server.
pub trait Reviewer: Send + Sync + 'static {
    /// The user a bearer token belongs to; `Ok(None)` when the API server does not accept it.
    fn authenticate(&self, token: String) -> BoxFuture<'static, Result<Option<User>, String>>;
    /// Whether `user` may `verb` `nodes/proxy` on `node`.
    fn authorize(
        &self,
        user: User,
        verb: String,
        node: String,
    ) -> BoxFuture<'static, Result<bool, String>>;
}

/// [`Reviewer`] through the API server (the agent's node credentials may create both reviews:
/// the Node authorizer grants them, as it does to kubelets).
pub struct KubeReviewer {
    client: kube::Client,
}

impl KubeReviewer {
    pub fn new(client: kube::Client) -> Self {
        Self { client }
    }
}

impl Reviewer for KubeReviewer {
    fn authenticate(&self, token: String) -> BoxFuture<'static, Result<Option<User>, String>> {
        let api: Api<TokenReview> = Api::all(self.client.clone());
        Box::pin(async move {
            let review = TokenReview {
                spec: TokenReviewSpec {
                    token,
                    ..TokenReviewSpec::default()
                },
                ..TokenReview::default()
            };
            let done = api
                .create(&PostParams::default(), &review)
                .await
                .map_err(|e| format!("TokenReview: {e}"))?;
            let Some(status) = done.status else {
                return Ok(None);
            };
            if status.authenticated != Some(true) {
                return Ok(None);
            }
            let info = status.user.unwrap_or_default();
            Ok(Some(User {
                username: info.username.unwrap_or_default(),
                uid: info.uid.unwrap_or_default(),
                groups: info.groups.unwrap_or_default(),
                extra: info.extra.unwrap_or_default().into_iter().collect(),
            }))
        })
    }

    fn authorize(
        &self,
        user: User,
        verb: String,
        node: String,
    ) -> BoxFuture<'static, Result<bool, String>> {
        let api: Api<SubjectAccessReview> = Api::all(self.client.clone());
        Box::pin(async move {
            let review = SubjectAccessReview {
                spec: SubjectAccessReviewSpec {
                    user: Some(user.username),
                    uid: (!user.uid.is_empty()).then_some(user.uid),
                    groups: Some(user.groups),
                    extra: (!user.extra.is_empty()).then(|| user.extra.into_iter().collect()),
                    resource_attributes: Some(ResourceAttributes {
                        verb: Some(verb),
                        resource: Some("nodes".into()),
                        subresource: Some("proxy".into()),
                        name: Some(node),
                        ..ResourceAttributes::default()
                    }),
                    ..SubjectAccessReviewSpec::default()
                },
                ..SubjectAccessReview::default()
            };
            let done = api
                .create(&PostParams::default(), &review)
                .await
                .map_err(|e| format!("SubjectAccessReview: {e}"))?;
            Ok(done.status.is_some_and(|s| s.allowed))
        })
    }
}

/// What the listener serves and how it decides who may see it.
pub struct ApiState {
    pub node_name: String,
    /// The flows, read as of each request (the kernel's pending records drained first).
    pub flows: Arc<FlowSource>,
    pub status: SharedStatus,
    pub reviewer: Arc<dyn Reviewer>,
    pub metrics: Metrics,
    /// The keystore file of the key in force: its modification time is the key's age.
    pub key_file: Option<std::path::PathBuf>,
}

/// Who the TLS layer says the client is (a verified client certificate), per connection.
#[derive(Debug, Clone, Default)]
struct PeerCert(Option<User>);

/// A bound, not yet serving, API listener.
pub struct ApiServer {
    listener: TcpListener,
    addr: SocketAddr,
    acceptor: TlsAcceptor,
    router: Router,
}

/// Loads `<state_dir>/api-tls.{crt,key}`, or creates them (key 0600) for `names`.
pub fn serving_cert(
    state_dir: &Path,
    names: &[String],
) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), ApiError> {
    let cert_path = state_dir.join(CERT_FILE);
    let key_path = state_dir.join(KEY_FILE);
    if cert_path.exists() && key_path.exists() {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| ApiError::CertFile {
                path: p.to_owned(),
                source,
            })
        };
        let cert =
            pem_block(&read(&cert_path)?, "CERTIFICATE").ok_or_else(|| ApiError::CertInvalid {
                path: cert_path.clone(),
                problem: "no CERTIFICATE block".into(),
            })?;
        let key =
            pem_block(&read(&key_path)?, "PRIVATE KEY").ok_or_else(|| ApiError::CertInvalid {
                path: key_path.clone(),
                problem: "no PRIVATE KEY block".into(),
            })?;
        return Ok((
            CertificateDer::from(cert),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
        ));
    }
    let generated =
        rcgen::generate_simple_self_signed(names.to_vec()).map_err(ApiError::Generate)?;
    std::fs::create_dir_all(state_dir).map_err(|source| ApiError::CertFile {
        path: state_dir.to_owned(),
        source,
    })?;
    write_private(&key_path, generated.signing_key.serialize_pem().as_bytes())?;
    write_private(&cert_path, generated.cert.pem().as_bytes())?;
    Ok((
        generated.cert.der().clone(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            generated.signing_key.serialize_der(),
        )),
    ))
}

fn write_private(path: &Path, data: &[u8]) -> Result<(), ApiError> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let tmp = path.with_extension("tmp");
    let err = |source| ApiError::CertFile {
        path: path.to_owned(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(data).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

/// The DER of the first PEM block labelled `label` in `text`.
pub fn pem_block(text: &str, label: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = text.find(&begin)? + begin.len();
    let stop = start + text[start..].find(&end)?;
    let body: String = text[start..stop].split_whitespace().collect();
    base64::engine::general_purpose::STANDARD.decode(body).ok()
}

/// Every PEM block labelled `label` in `text`.
fn pem_blocks(mut text: &str, label: &str) -> Vec<Vec<u8>> {
    let end = format!("-----END {label}-----");
    let mut out = Vec::new();
    while let Some(der) = pem_block(text, label) {
        out.push(der);
        match text.find(&end) {
            Some(i) => text = &text[i + end.len()..],
            None => break,
        }
    }
    out
}

impl ApiServer {
    /// Binds `addr` with the serving certificate from the state dir; `client_ca` enables client
    /// certificates signed by it (the API server's node-proxy identity).
    pub async fn bind(
        addr: SocketAddr,
        state_dir: &Path,
        client_ca: Option<&Path>,
        state: ApiState,
    ) -> Result<Self, ApiError> {
        let names = vec![state.node_name.clone(), "localhost".to_string()];
        let (cert, key) = serving_cert(state_dir, &names)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(ApiError::Tls)?;
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let problem = |problem: String| ApiError::ClientCa {
                    path: path.to_owned(),
                    problem,
                };
                let text = std::fs::read_to_string(path).map_err(|e| problem(e.to_string()))?;
                let mut roots = RootCertStore::empty();
                for der in pem_blocks(&text, "CERTIFICATE") {
                    roots
                        .add(CertificateDer::from(der))
                        .map_err(|e| problem(e.to_string()))?;
                }
                if roots.is_empty() {
                    return Err(problem("no CERTIFICATE block".into()));
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .allow_unauthenticated()
                        .build()
                        .map_err(|e| problem(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(vec![cert], key)
            .map_err(ApiError::Tls)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ApiError::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| ApiError::Bind { addr, source })?;
        let state = Arc::new(state);
        let router = Router::new()
            .route("/flows", get(flows))
            .route("/status", get(status))
            .layer(middleware::from_fn_with_state(state.clone(), authn_authz))
            .with_state(state);
        Ok(Self {
            listener,
            addr,
            acceptor: TlsAcceptor::from(Arc::new(config)),
            router,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until the drain starts (connections in flight are closed with it).
    pub async fn run(self, mut drain: Drain) -> Result<(), ApiError> {
        let mut connections = JoinSet::new();
        loop {
            let (tcp, remote) = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(error) => {
                        tracing::debug!(%error, "accept on the API listener");
                        continue;
                    }
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => continue,
                () = drain.signaled() => break,
            };
            let acceptor = self.acceptor.clone();
            let router = self.router.clone();
            connections.spawn(async move {
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(error)) => {
                        tracing::debug!(%remote, %error, "TLS handshake on the API listener");
                        return;
                    }
                    Err(_) => return,
                };
                let peer = PeerCert(
                    tls.get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .and_then(|c| cert_user(c.as_ref())),
                );
                let service =
                    hyper_util::service::TowerToHyperService::new(router.layer(Extension(peer)));
                let io = hyper_util::rt::TokioIo::new(tls);
                if let Err(error) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await
                {
                    tracing::debug!(%remote, %error, "API connection");
                }
            });
        }
        connections.shutdown().await;
        Ok(())
    }
}

/// The user of a verified client certificate: common name = user, organizations = groups
/// (the Kubernetes x509 convention).
pub fn cert_user(der: &[u8]) -> Option<User> {
    let subject = x509_subject(der)?;
    let mut user = User::default();
    for (oid, value) in subject {
        match oid.as_slice() {
            [0x55, 0x04, 0x03] => user.username = value,
            [0x55, 0x04, 0x0a] => user.groups.push(value),
            _ => {}
        }
    }
    (!user.username.is_empty()).then_some(user)
}

/// One DER TLV: (tag, content, rest).
fn der_next(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&len0, mut rest) = rest.split_first()?;
    let len = if len0 < 0x80 {
        usize::from(len0)
    } else {
        let n = usize::from(len0 & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let mut l = 0usize;
        for b in &rest[..n] {
            l = (l << 8) | usize::from(*b);
        }
        rest = &rest[n..];
        l
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// The subject's (attribute OID, string value) pairs of a DER certificate.
fn x509_subject(der: &[u8]) -> Option<Vec<(Vec<u8>, String)>> {
    let (_, cert, _) = der_next(der)?; // Certificate
    let (_, tbs, _) = der_next(cert)?; // TBSCertificate
    let mut rest = tbs;
    let (tag, _, r) = der_next(rest)?;
    rest = if tag == 0xa0 { der_next(r)?.2 } else { r }; // [0] version, then serial
    let (_, _, r) = der_next(rest)?; // signature algorithm
    let (_, _, r) = der_next(r)?; // issuer
    let (_, _, r) = der_next(r)?; // validity
    let (_, mut subject, _) = der_next(r)?;
    let mut out = Vec::new();
    while !subject.is_empty() {
        let (_, set, r) = der_next(subject)?;
        subject = r;
        let mut set = set;
        while !set.is_empty() {
            let (_, atv, r) = der_next(set)?;
            set = r;
            let (_, oid, r) = der_next(atv)?;
            let (_, value, _) = der_next(r)?;
            out.push((oid.to_vec(), String::from_utf8_lossy(value).into_owned()));
        }
    }
    Some(out)
}

fn verb_of(method: &axum::http::Method) -> &'static str {
    match *method {
        axum::http::Method::GET | axum::http::Method::HEAD => "get",
        axum::http::Method::POST => "create",
        axum::http::Method::PUT => "update",
        axum::http::Method::PATCH => "patch",
        axum::http::Method::DELETE => "delete",
        _ => "proxy",
    }
}

fn path_label(path: &str) -> &'static str {
    match path {
        "/flows" => "/flows",
        "/status" => "/status",
        _ => "other",
    }
}

async fn authn_authz(State(state): State<Arc<ApiState>>, request: Request, next: Next) -> Response {
    let path = path_label(request.uri().path());
    let response = decide(&state, request, next).await;
    state
        .metrics
        .api_requests
        .get_or_create(&ApiLabels {
            path,
            code: response.status().as_u16(),
        })
        .inc();
    response
}

async fn decide(state: &ApiState, request: Request, next: Next) -> Response {
    let cert = request
        .extensions()
        .get::<PeerCert>()
        .and_then(|p| p.0.clone());
    let user = match cert {
        Some(user) => user,
        None => {
            let headers = request.headers();
            let token = headers
                .get(header::AUTHORIZATION)
                .or_else(|| headers.get(TOKEN_HEADER))
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::trim)
                .filter(|t| !t.is_empty());
            let Some(token) = token else {
                return unauthorized("no client certificate and no bearer token");
            };
            match state.reviewer.authenticate(token.to_string()).await {
                Ok(Some(user)) => user,
                Ok(None) => return unauthorized("the API server did not accept the token"),
                Err(error) => {
                    tracing::warn!(%error, "authenticating an API request");
                    return (StatusCode::SERVICE_UNAVAILABLE, format!("{error}\n")).into_response();
                }
            }
        }
    };
    let verb = verb_of(request.method());
    match state
        .reviewer
        .authorize(user.clone(), verb.to_string(), state.node_name.clone())
        .await
    {
        Ok(true) => next.run(request).await,
        Ok(false) => (
            StatusCode::FORBIDDEN,
            format!(
                "user {:?} may not {verb} nodes/proxy on node {}\n",
                user.username, state.node_name
            ),
        )
            .into_response(),
        Err(error) => {
            tracing::warn!(%error, "authorising an API request");
            (StatusCode::SERVICE_UNAVAILABLE, format!("{error}\n")).into_response()
        }
    }
}

fn unauthorized(why: &str) -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        format!("unauthorized: {why}\n"),
    )
        .into_response()
}

/// Query of `/flows`.
#[derive(Debug, Default, Deserialize)]
pub struct FlowsQuery {
    /// Unix seconds: read the flow history from here instead of the live table.
    pub since: Option<u64>,
    /// Unix seconds, with `since` (default now).
    pub until: Option<u64>,
}

/// A `/flows` query that parses but asks for no sensible window (answered 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlowsQueryError {
    #[error("until={until} needs since")]
    UntilWithoutSince { until: u64 },
    #[error("until={until} is before since={since}")]
    Reversed { since: u64, until: u64 },
}

impl FlowsQuery {
    /// The history window asked for: `None` for the live table (no `since`), else `since` to
    /// `until` (default `now`).
    pub fn window(&self, now: u64) -> Result<Option<Period>, FlowsQueryError> {
        match (self.since, self.until) {
            (None, None) => Ok(None),
            (None, Some(until)) => Err(FlowsQueryError::UntilWithoutSince { until }),
            (Some(since), until) => {
                let until = until.unwrap_or(now);
                if until < since {
                    return Err(FlowsQueryError::Reversed { since, until });
                }
                Ok(Some(Period {
                    from: since,
                    to: until,
                }))
            }
        }
    }
}

/// The body of `/flows`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FlowsResponse {
    pub node_name: String,
    /// Unix seconds when the answer was made.
    pub now: u64,
    pub flows: Vec<crate::flows::Flow>,
    /// With `since`: the window asked for and the periods the agent was recording within it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<Period>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub coverage: Vec<Period>,
    /// Unix seconds when this node's key in force was written (generated or promoted by a
    /// rotation), for the key age in reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_created_at: Option<u64>,
}

/// Unix seconds of `path`'s last modification.
fn modified_unix(path: &std::path::Path) -> Option<u64> {
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok()?;
    modified
        .duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs())
}

async fn flows(State(state): State<Arc<ApiState>>, Query(q): Query<FlowsQuery>) -> Response {
    let now = unix_now();
    let key_created_at = state.key_file.as_deref().and_then(modified_unix);
    let window = match q.window(now) {
        Ok(window) => window,
        Err(error) => return (StatusCode::BAD_REQUEST, format!("{error}\n")).into_response(),
    };
    let body = match window {
        None => FlowsResponse {
            node_name: state.node_name.clone(),
            now,
            flows: {
                let source = state.flows.clone();
                match tokio::task::spawn_blocking(move || source.live()).await {
                    Ok(flows) => flows,
                    Err(error) => {
                        return (StatusCode::INTERNAL_SERVER_ERROR, format!("{error}\n"))
                            .into_response();
                    }
                }
            },
            window: None,
            coverage: Vec::new(),
            key_created_at,
        },
        Some(Period { from, to }) => {
            if !state.flows.has_history() {
                return (StatusCode::NOT_FOUND, "no flow history on this agent\n").into_response();
            }
            let source = state.flows.clone();
            let read = tokio::task::spawn_blocking(move || source.history(from, to)).await;
            match read {
                Ok(Ok((flows, coverage))) => FlowsResponse {
                    node_name: state.node_name.clone(),
                    now,
                    flows,
                    window: Some(Period { from, to }),
                    coverage,
                    key_created_at,
                },
                Ok(Err(error)) => {
                    return (StatusCode::INTERNAL_SERVER_ERROR, format!("{error}\n"))
                        .into_response();
                }
                Err(error) => {
                    return (StatusCode::INTERNAL_SERVER_ERROR, format!("{error}\n"))
                        .into_response();
                }
            }
        }
    };
    (
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_string(&body).unwrap_or_default(),
    )
        .into_response()
}

async fn status(State(state): State<Arc<ApiState>>) -> Response {
    let report = state
        .status
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    match report {
        Some(report) => (
            [(header::CONTENT_TYPE, "application/json")],
            serde_json::to_string_pretty(&report).unwrap_or_default(),
        )
            .into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, "no status yet\n").into_response(),
    }
}

#[cfg(test)]
mod tests;
