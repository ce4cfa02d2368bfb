//! Reaching the agents' authenticated API through the API server's node proxy
//! (`/api/v1/nodes/https:<node>:9872/proxy/<path>`), with nothing but a kubeconfig. The API
//! server checks the caller's RBAC on `nodes/proxy`; it removes the `Authorization` header after
//! authenticating the caller and presents no identity of its own on ports other than the
//! kubelet's, so meshctl also sends the caller's bearer token in
//! `X-Wiremesh-Authorization`, and the agent checks it again (TokenReview, then a
//! SubjectAccessReview on `nodes/proxy`).

use std::path::Path;

use kube::Client;
use mesh_agent::api::{FlowsResponse, TOKEN_HEADER};

/// The agents' API port.
pub const API_PORT: u16 = 9872;

/// How long one request to an agent may take, retries of the API server connection included:
/// an unreachable node must not stall a report or `meshctl flows` (it becomes a gap instead).
pub const AGENT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// Why an agent could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("kubeconfig {path}: {problem}")]
    Kubeconfig { path: String, problem: String },
    #[error("node {node}: GET {path} through the API server's node proxy: {source}")]
    Request {
        node: String,
        path: String,
        #[source]
        source: kube::Error,
    },
    #[error("node {node}: GET {path} through the API server's node proxy: no answer within {}s", AGENT_TIMEOUT.as_secs())]
    Timeout { node: String, path: String },
    #[error("node {node}: {path}: not the expected JSON: {source}")]
    Decode {
        node: String,
        path: String,
        #[source]
        source: serde_json::Error,
    },
}

/// The API server path that proxies `path` (starting with `/`) to `node`'s agent over HTTPS.
pub fn proxy_path(node: &str, path: &str) -> String {
    format!("/api/v1/nodes/https:{node}:{API_PORT}/proxy{path}")
}

/// A client for the agents' API: the API server connection and the caller's bearer token.
#[derive(Clone)]
pub struct Agents {
    client: Client,
    token: Option<String>,
}

impl Agents {
    /// From an API client and the bearer token it authenticates with.
    pub fn new(client: Client, token: Option<String>) -> Self {
        Self { client, token }
    }

    /// The API client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// From the kubeconfig `path` (or `$KUBECONFIG`, then the in-cluster service account): the
    /// current context's user must authenticate with a bearer token (`token` or `tokenFile`).
    pub async fn connect(client: Client, kubeconfig: Option<&Path>) -> Result<Self, AgentError> {
        Ok(Self::new(client, Some(bearer_token(kubeconfig)?)))
    }

    /// The body of `GET path` on `node`'s agent API.
    pub async fn get(&self, node: &str, path: &str) -> Result<String, AgentError> {
        get_with(&self.client, self.token.as_deref(), node, path).await
    }

    /// [`flows`] on this client.
    pub async fn flows(
        &self,
        node: &str,
        since: Option<u64>,
        until: Option<u64>,
    ) -> Result<FlowsResponse, AgentError> {
        let mut path = "/flows".to_string();
        if let Some(s) = since {
            path.push_str(&format!("?since={s}"));
            if let Some(u) = until {
                path.push_str(&format!("&until={u}"));
            }
        }
        let body = self.get(node, &path).await?;
        serde_json::from_str(&body).map_err(|source| AgentError::Decode {
            node: node.to_string(),
            path,
            source,
        })
    }
}

/// The bearer token of the kubeconfig's current user (see [`Agents::connect`]).
pub fn bearer_token(kubeconfig: Option<&Path>) -> Result<String, AgentError> {
    use secrecy::ExposeSecret as _;
    let env = std::env::var_os("KUBECONFIG").map(std::path::PathBuf::from);
    let path = kubeconfig.map(Path::to_path_buf).or(env);
    let Some(path) = path else {
        let sa = "/var/run/secrets/kubernetes.io/serviceaccount/token";
        return std::fs::read_to_string(sa)
            .map(|t| t.trim().to_string())
            .map_err(|e| AgentError::Kubeconfig {
                path: sa.into(),
                problem: e.to_string(),
            });
    };
    let problem = |problem: String| AgentError::Kubeconfig {
        path: path.display().to_string(),
        problem,
    };
    let config = kube::config::Kubeconfig::read_from(&path).map_err(|e| problem(e.to_string()))?;
    let context = config
        .current_context
        .as_ref()
        .and_then(|c| config.contexts.iter().find(|n| &n.name == c))
        .and_then(|c| c.context.as_ref())
        .ok_or_else(|| problem("no current context".into()))?;
    let user = context.user.clone().unwrap_or_default();
    let auth = config
        .auth_infos
        .iter()
        .find(|a| a.name == user)
        .and_then(|a| a.auth_info.as_ref())
        .ok_or_else(|| problem(format!("no user {user:?}")))?;
    if let Some(t) = &auth.token {
        return Ok(t.expose_secret().to_string());
    }
    if let Some(file) = &auth.token_file {
        return std::fs::read_to_string(file)
            .map(|t| t.trim().to_string())
            .map_err(|e| problem(format!("tokenFile {file}: {e}")));
    }
    Err(problem(format!(
        "user {user:?} has no bearer token: the agents' API checks the caller's token itself \
         (the API server does not pass client-certificate identities through nodes/proxy)"
    )))
}

/// The body of `GET path` on `node`'s agent API, sending `token` for the agent's own check.
pub async fn get_with(
    client: &Client,
    token: Option<&str>,
    node: &str,
    path: &str,
) -> Result<String, AgentError> {
    let mut request = http::Request::get(proxy_path(node, path));
    if let Some(t) = token {
        request = request.header(TOKEN_HEADER, format!("Bearer {t}"));
    }
    let request = request
        .body(Vec::new())
        .expect("a GET request with a valid path");
    match tokio::time::timeout(AGENT_TIMEOUT, client.request_text(request)).await {
        Ok(answer) => answer.map_err(|source| AgentError::Request {
            node: node.to_string(),
            path: path.to_string(),
            source,
        }),
        Err(_) => Err(AgentError::Timeout {
            node: node.to_string(),
            path: path.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_proxy_path_names_scheme_node_and_port() {
        assert_eq!(
            proxy_path("node-1", "/flows?since=5"),
            "/api/v1/nodes/https:node-1:9872/proxy/flows?since=5"
        );
    }
}
