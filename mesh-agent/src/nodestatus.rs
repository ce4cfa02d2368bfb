//! The live state an agent reports about itself, for operators: the status of the cluster-scoped
//! `MeshNode` named after this node (owner reference to the Node, so it goes with it). Only this
//! node's agent writes it; `meshctl status` and the rotation coordinator read it; no agent
//! watches it, so a write wakes nobody (it used to be a Node annotation, and every write woke
//! every agent's Node watch: O(N²) events). `GET /status` on the agent serves the same document.
//!
//! The types live in `wiremesh_crds::meshnode` (they are the CRD's schema); this module writes
//! them. Writes are server-side apply with field manager [`FIELD_MANAGER`], so a field that is no
//! longer set (an error that cleared) is removed, not left behind as a merge patch would.

use k8s_openapi::{api::core::v1::Node, apimachinery::pkg::apis::meta::v1::OwnerReference};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
pub use wiremesh_crds::meshnode::{
    CONDITION_SETTINGS_APPLIED, CONVERGED_LABEL, HANDSHAKE_FRESH, MeshNode, MeshNodeEbpf,
    MeshNodePeer, MeshNodeRejected, MeshNodeStatus, STATUS_INTERVAL_ANNOTATION, STATUS_VERSION,
    unix_seconds,
};

/// Field manager of the agent's MeshNode writes.
pub const FIELD_MANAGER: &str = "wiremesh-agent";

/// Why the MeshNode could not be written.
#[derive(Debug, thiserror::Error)]
pub enum NodeStatusError {
    #[error("get own Node {node} (for the MeshNode's owner reference): {source}")]
    GetNode {
        node: String,
        #[source]
        source: kube::Error,
    },
    #[error("own Node {node} has no uid")]
    NoUid { node: String },
    #[error("create MeshNode {node}: {source}")]
    Create {
        node: String,
        #[source]
        source: kube::Error,
    },
    #[error("write status of MeshNode {node}: {source}")]
    Status {
        node: String,
        #[source]
        source: kube::Error,
    },
}

/// Writes this node's `MeshNode`.
pub struct NodeStatusWriter {
    node: String,
    nodes: Api<Node>,
    meshnodes: Api<MeshNode>,
    /// The object exists with our owner reference (checked once per run, and again after a
    /// failed status write: the Node, and with it the MeshNode, may have been recreated).
    ensured: bool,
    /// The Node's uid, for the owner reference of every apply of the object.
    node_uid: Option<String>,
    /// The converged label and interval annotation last applied.
    applied: Option<(bool, u64)>,
}

impl NodeStatusWriter {
    pub fn new(client: Client, node: &str) -> Self {
        Self {
            node: node.to_string(),
            nodes: Api::all(client.clone()),
            meshnodes: Api::all(client),
            ensured: false,
            node_uid: None,
            applied: None,
        }
    }

    /// The MeshNode object (no status) as this agent applies it: the owner reference, the
    /// [`CONVERGED_LABEL`] and the [`STATUS_INTERVAL_ANNOTATION`].
    pub fn object(
        node: &str,
        node_uid: &str,
        converged: bool,
        interval_secs: u64,
    ) -> serde_json::Value {
        let owner = OwnerReference {
            api_version: "v1".into(),
            kind: "Node".into(),
            name: node.into(),
            uid: node_uid.into(),
            ..OwnerReference::default()
        };
        serde_json::json!({
            "apiVersion": "wiremesh.io/v1alpha1",
            "kind": "MeshNode",
            "metadata": {
                "name": node,
                "ownerReferences": [owner],
                "labels": { CONVERGED_LABEL: converged.to_string() },
                "annotations": { STATUS_INTERVAL_ANNOTATION: interval_secs.to_string() },
            },
            "spec": {},
        })
    }

    fn params() -> PatchParams {
        PatchParams::apply(FIELD_MANAGER).force()
    }

    /// Applies the object (owner reference, label, annotation); reads the Node's uid first when
    /// the object is not known to exist (the Node may have been recreated).
    async fn ensure(&mut self, converged: bool, interval_secs: u64) -> Result<(), NodeStatusError> {
        let uid = match (&self.node_uid, self.ensured) {
            (Some(uid), true) => uid.clone(),
            _ => {
                let node = self.nodes.get(&self.node).await.map_err(|source| {
                    NodeStatusError::GetNode {
                        node: self.node.clone(),
                        source,
                    }
                })?;
                node.metadata.uid.ok_or_else(|| NodeStatusError::NoUid {
                    node: self.node.clone(),
                })?
            }
        };
        self.meshnodes
            .patch(
                &self.node,
                &Self::params(),
                &Patch::Apply(Self::object(&self.node, &uid, converged, interval_secs)),
            )
            .await
            .map_err(|source| NodeStatusError::Create {
                node: self.node.clone(),
                source,
            })?;
        self.node_uid = Some(uid);
        self.ensured = true;
        self.applied = Some((converged, interval_secs));
        Ok(())
    }

    /// Applies `status` (creating the object first if needed, and re-applying it when the
    /// converged label or the interval changes).
    pub async fn write(&mut self, status: &MeshNodeStatus) -> Result<(), NodeStatusError> {
        let wanted = (status.converged(), status.interval_secs);
        if !self.ensured || self.applied != Some(wanted) {
            self.ensure(wanted.0, wanted.1).await?;
        }
        let body = serde_json::json!({
            "apiVersion": "wiremesh.io/v1alpha1",
            "kind": "MeshNode",
            "status": status,
        });
        let result = self
            .meshnodes
            .patch_status(&self.node, &Self::params(), &Patch::Apply(body))
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(source) => {
                self.ensured = false;
                Err(NodeStatusError::Status {
                    node: self.node.clone(),
                    source,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_object_is_owned_by_its_node() {
        let object = NodeStatusWriter::object("node-1", "uid-1", true, 30);
        assert_eq!(object["metadata"]["labels"][CONVERGED_LABEL], "true");
        assert_eq!(
            object["metadata"]["annotations"][STATUS_INTERVAL_ANNOTATION],
            "30"
        );
        assert_eq!(object["metadata"]["name"], "node-1");
        let owner = &object["metadata"]["ownerReferences"][0];
        assert_eq!(owner["kind"], "Node");
        assert_eq!(owner["uid"], "uid-1");
        assert_eq!(owner["name"], "node-1");
        // Deleting the Node deletes its MeshNode; no finalizer rights needed on Nodes.
        assert!(owner.get("blockOwnerDeletion").is_none());
        let parsed: MeshNode = serde_json::from_value(object).unwrap();
        assert_eq!(parsed.metadata.name.as_deref(), Some("node-1"));
    }
}
