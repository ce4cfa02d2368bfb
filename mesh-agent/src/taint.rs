//! The opt-in readiness taint (`--readiness-taint`, Helm `readinessTaint.enabled`): a node
//! registered with `wiremesh.io/not-ready:NoSchedule` (kubelet `--register-with-taints`) gets no
//! new workloads until its agent has converged, so in Strict mode no pod starts on a node that
//! would drop its cross-node traffic. The agent removes the taint once, the first time its
//! snapshot is converged (every wanted peer on the device as wanted, see
//! [`MeshSnapshot::converged`]); it never adds it (nodes register with it, as with Cilium's
//! `node.cilium.io/agent-not-ready`). The removal is a merge patch of `spec.taints` carrying the
//! Node's `resourceVersion`: a concurrent change to the taints (another controller, an operator)
//! makes the apiserver refuse it with a conflict and the agent retries on fresh data, so nothing
//! but this one taint is ever dropped. The admission policy `agent-scope` allows the agent exactly
//! this change of its own Node's spec.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Taint};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use serde_json::json;
use tokio::sync::watch;

use crate::{drain::Drain, reconciler::MeshSnapshot};

/// The taint's key.
pub const NOT_READY_TAINT: &str = "wiremesh.io/not-ready";

/// Why one removal attempt failed (it is retried).
#[derive(Debug, thiserror::Error)]
pub enum TaintError {
    #[error("read node {node}: {source}")]
    Get {
        node: String,
        #[source]
        source: kube::Error,
    },
    #[error("remove taint {NOT_READY_TAINT} from node {node}: {source}")]
    Patch {
        node: String,
        #[source]
        source: kube::Error,
    },
}

/// `taints` without the readiness taint, or `None` when it is not there (nothing to do).
pub fn without_not_ready(taints: &[Taint]) -> Option<Vec<Taint>> {
    let kept: Vec<Taint> = taints
        .iter()
        .filter(|t| t.key != NOT_READY_TAINT)
        .cloned()
        .collect();
    (kept.len() != taints.len()).then_some(kept)
}

/// Removes the taint from `node` once `snapshot` is converged, then waits for the drain.
pub struct TaintRemover {
    nodes: Api<Node>,
    node: String,
    snapshot: watch::Receiver<MeshSnapshot>,
}

impl TaintRemover {
    pub fn new(client: Client, node: String, snapshot: watch::Receiver<MeshSnapshot>) -> Self {
        Self {
            nodes: Api::all(client),
            node,
            snapshot,
        }
    }

    /// One attempt: `Ok(true)` when the taint was removed, `Ok(false)` when there was none.
    pub async fn remove_once(&self) -> Result<bool, TaintError> {
        let node = self
            .nodes
            .get(&self.node)
            .await
            .map_err(|source| TaintError::Get {
                node: self.node.clone(),
                source,
            })?;
        let taints = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_deref())
            .unwrap_or_default();
        let Some(kept) = without_not_ready(taints) else {
            return Ok(false);
        };
        // resourceVersion makes the patch conditional: a 409 Conflict if the Node changed since.
        let patch = json!({
            "metadata": {"resourceVersion": node.metadata.resource_version},
            "spec": {"taints": kept},
        });
        self.nodes
            .patch(&self.node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|source| TaintError::Patch {
                node: self.node.clone(),
                source,
            })?;
        Ok(true)
    }

    /// Waits for convergence, removes the taint (retrying with backoff up to 30 s), then idles
    /// until the drain.
    pub async fn run(mut self, mut drain: Drain) {
        let closed = tokio::select! {
            converged = self.snapshot.wait_for(MeshSnapshot::converged) => converged.is_err(),
            () = drain.signaled() => return,
        };
        // The reconciler is gone: never converged, the taint stays.
        if closed {
            drain.signaled().await;
            return;
        }
        let mut backoff = Duration::from_millis(500);
        loop {
            match self.remove_once().await {
                Ok(removed) => {
                    if removed {
                        tracing::info!(node = %self.node, taint = NOT_READY_TAINT, "mesh converged: removed the readiness taint");
                    } else {
                        tracing::info!(node = %self.node, taint = NOT_READY_TAINT, "mesh converged; the node has no readiness taint");
                    }
                    break;
                }
                Err(error) => {
                    tracing::warn!(error = %error, retry_in = ?backoff, "readiness taint not removed yet");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = drain.signaled() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
        drain.signaled().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taint(key: &str, effect: &str) -> Taint {
        Taint {
            key: key.to_owned(),
            effect: effect.to_owned(),
            ..Taint::default()
        }
    }

    #[test]
    fn only_the_readiness_taint_is_removed() {
        let taints = vec![
            taint("node.kubernetes.io/not-ready", "NoExecute"),
            taint(NOT_READY_TAINT, "NoSchedule"),
            taint("dedicated", "NoSchedule"),
        ];
        assert_eq!(
            without_not_ready(&taints),
            Some(vec![
                taint("node.kubernetes.io/not-ready", "NoExecute"),
                taint("dedicated", "NoSchedule"),
            ])
        );
    }

    #[test]
    fn nothing_to_do_without_it() {
        assert_eq!(without_not_ready(&[]), None);
        assert_eq!(without_not_ready(&[taint("dedicated", "NoSchedule")]), None);
    }
}
