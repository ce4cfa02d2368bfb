//! The agent's metrics listener: `/healthz` (the process serves), `/readyz` (caches synced and the
//! mesh reconciled at least once) and `/metrics` (Prometheus text format), unauthenticated as
//! probes and scrapers expect. Flows and status are served only by the authenticated API
//! listener ([`crate::api`]).

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

use crate::{drain::Drain, reconciler::MeshSnapshot};

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
    ) -> Result<Self, AdminError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| AdminError::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| AdminError::Bind { addr, source })?;
        let state = Arc::new(AdminState { registry, snapshot });
        let router = Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
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

async fn readyz(State(state): State<Arc<AdminState>>) -> Response {
    let snapshot = state.snapshot.borrow().clone();
    if snapshot.synced && snapshot.reconciled {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        let why = if snapshot.synced {
            "caches synced, first reconcile pending"
        } else {
            "caches not synced"
        };
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
            .into_response()
    }
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
        let server = AdminServer::bind("127.0.0.1:0".parse().unwrap(), registry, rx)
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
        });
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
