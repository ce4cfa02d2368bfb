//! The agent's metrics listener: `/healthz` (the datapath is alive: fails while the device process
//! is gone or its link was deleted; not while the agent is still starting), `/readyz` (converged:
//! caches synced, the last pass without error, every wanted peer configured, the device alive) and
//! `/metrics` (Prometheus text format), unauthenticated as probes and scrapers expect. Flows and
//! status are served only by the authenticated API listener ([`crate::api`]).

use std::{net::SocketAddr, sync::Arc};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use prometheus_client::{encoding::text::encode, registry::Registry};
use tokio::{net::TcpListener, sync::watch};

use crate::{drain::Drain, health::DatapathHealth, reconciler::MeshSnapshot};

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("bind HTTP server on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP server on {addr}: {source}")]
    Serve {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

struct AdminState {
    registry: Registry,
    snapshot: watch::Receiver<MeshSnapshot>,
    health: watch::Receiver<DatapathHealth>,
}

/// A bound, not yet serving, admin server.
pub struct AdminServer {
    listener: TcpListener,
    addr: SocketAddr,
    router: Router,
}

impl AdminServer {
    /// Binds `addr` (port 0 picks a free port; see [`AdminServer::local_addr`]).
    pub async fn bind(
        addr: SocketAddr,
        registry: Registry,
        snapshot: watch::Receiver<MeshSnapshot>,
        health: watch::Receiver<DatapathHealth>,
    ) -> Result<Self, AdminError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| AdminError::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| AdminError::Bind { addr, source })?;
        let state = Arc::new(AdminState {
            registry,
            snapshot,
            health,
        });
        let router = Router::new()
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics))
            .with_state(state);
        Ok(Self {
            listener,
            addr,
            router,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until the drain starts.
    pub async fn run(self, mut drain: Drain) -> Result<(), AdminError> {
        let addr = self.addr;
        axum::serve(self.listener, self.router)
            .with_graceful_shutdown(async move { drain.signaled().await })
            .await
            .map_err(|source| AdminError::Serve { addr, source })
    }
}

async fn healthz(State(state): State<Arc<AdminState>>) -> Response {
    match state.health.borrow().check() {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("datapath dead: {why}\n"),
        )
            .into_response(),
    }
}

async fn readyz(State(state): State<Arc<AdminState>>) -> Response {
    let snapshot = state.snapshot.borrow().clone();
    let health = state.health.borrow().clone();
    let why = if !snapshot.synced {
        "caches not synced".to_string()
    } else if !snapshot.reconciled {
        "caches synced, first reconcile pending".to_string()
    } else if snapshot.datapath.is_none() || health.starting {
        "no WireGuard device yet".to_string()
    } else if let Err(why) = health.check() {
        format!("datapath dead: {why}")
    } else if let Some(error) = &snapshot.error {
        format!("last pass failed: {error}")
    } else if snapshot.configured.len() != snapshot.expected.len() {
        format!(
            "{} of {} peers configured",
            snapshot.configured.len(),
            snapshot.expected.len()
        )
    } else {
        return (StatusCode::OK, "ready\n").into_response();
    };
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("not ready: {why}\n"),
    )
        .into_response()
}

async fn metrics(State(state): State<Arc<AdminState>>) -> Response {
    let mut body = String::new();
    match encode(&mut body, &state.registry) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("encode: {e}\n")).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpStream,
    };

    use super::*;
    use crate::{drain, metrics::Metrics};

    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).await.unwrap();
        let code = text[9..12].parse().unwrap();
        let body = text
            .split("\r\n\r\n")
            .nth(1)
            .unwrap_or_default()
            .to_string();
        (code, body)
    }

    #[tokio::test]
    async fn endpoints_follow_readiness_and_serve_metrics() {
        let mut registry = Registry::with_prefix("wiremesh");
        let metrics = Metrics::new(&mut registry);
        metrics.peers_configured.set(2);
        let (tx, rx) = watch::channel(MeshSnapshot::default());
        let (health_tx, health_rx) = watch::channel(DatapathHealth {
            starting: true,
            ..DatapathHealth::default()
        });
        let server = AdminServer::bind("127.0.0.1:0".parse().unwrap(), registry, rx, health_rx)
            .await
            .unwrap();
        let addr = server.local_addr();
        let (trigger, drain) = drain::channel();
        let task = tokio::spawn(server.run(drain));

        assert_eq!(get(addr, "/healthz").await.0, 200);
        let (code, body) = get(addr, "/readyz").await;
        assert_eq!(code, 503);
        assert!(body.contains("caches not synced"), "{body}");
        // Flows and status are not served without authentication: not here at all.
        assert_eq!(get(addr, "/status").await.0, 404);
        assert_eq!(get(addr, "/flows").await.0, 404);
        tx.send_modify(|s| {
            s.synced = true;
            s.reconciled = true;
            s.datapath = Some(crate::select::Selection {
                choice: crate::config::DatapathChoice::Auto,
                kind: crate::datapath::DatapathKind::Userspace,
                reason: "no-kernel-module",
                message: String::new(),
            });
        });
        let (code, body) = get(addr, "/readyz").await;
        assert_eq!(code, 503);
        assert!(body.contains("no WireGuard device yet"), "{body}");
        health_tx.send_modify(|h| {
            h.starting = false;
            h.alive = true;
        });
        assert_eq!(get(addr, "/readyz").await.0, 200);
        // The device process dies: not healthy, not ready.
        health_tx.send_modify(|h| {
            h.alive = false;
            h.error = Some("datapath wm0: connection refused".into());
        });
        let (code, body) = get(addr, "/healthz").await;
        assert_eq!(code, 503);
        assert!(body.contains("connection refused"), "{body}");
        assert_eq!(get(addr, "/readyz").await.0, 503);
        health_tx.send_modify(|h| h.alive = true);
        // A peer not configured: not converged.
        tx.send_modify(|s| {
            s.expected.push((
                "b".into(),
                wiremesh_keyexchange::PrivateKey::generate()
                    .unwrap()
                    .public_key(),
            ))
        });
        let (code, body) = get(addr, "/readyz").await;
        assert_eq!(code, 503);
        assert!(body.contains("0 of 1 peers"), "{body}");
        tx.send_modify(|s| s.expected.clear());
        assert_eq!(get(addr, "/readyz").await.0, 200);
        let (code, body) = get(addr, "/metrics").await;
        assert_eq!(code, 200);
        assert!(body.contains("wiremesh_peers_configured 2"), "{body}");

        trigger.start();
        tokio::time::timeout(std::time::Duration::from_secs(5), task)
            .await
            .expect("server stops on drain")
            .unwrap()
            .unwrap();
    }
}
