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
    runtime::reflector::{ObjectRef, Store},
};
pub use wiremesh_crds::meshnode::{
    CONDITION_SETTINGS_APPLIED, EbpfReport, HANDSHAKE_FRESH, MeshNode, MeshNodeStatus, PeerReport,
    REPORT_VERSION, RejectedReport, unix_seconds,
};

/// The report an agent writes: the `MeshNode` status.
pub type NodeReport = MeshNodeStatus;

/// Field manager of the agent's MeshNode writes.
pub const FIELD_MANAGER: &str = "wiremesh-agent";

/// Why the MeshNode could not be written.
#[derive(Debug, thiserror::Error)]
pub enum NodeStatusError {
    #[error(
        "own Node {node} is not in the Node cache yet, or has no uid (needed for the MeshNode's owner reference)"
    )]
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
    /// The agent's Node cache (the agent may list and watch Nodes, not get them).
    nodes: Store<Node>,
    meshnodes: Api<MeshNode>,
    /// The object exists with our owner reference (checked once per run, and again after a
    /// failed status write: the Node, and with it the MeshNode, may have been recreated).
    ensured: bool,
}

impl NodeStatusWriter {
    pub fn new(client: Client, nodes: Store<Node>, node: &str) -> Self {
        Self {
            node: node.to_string(),
            nodes,
            meshnodes: Api::all(client),
            ensured: false,
        }
    }

    /// The MeshNode object (no status) as this agent applies it.
    pub fn object(node: &str, node_uid: &str) -> serde_json::Value {
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
            "metadata": { "name": node, "ownerReferences": [owner] },
            "spec": {},
        })
    }

    fn params() -> PatchParams {
        PatchParams::apply(FIELD_MANAGER).force()
    }

    async fn ensure(&mut self) -> Result<(), NodeStatusError> {
        let uid = self
            .nodes
            .get(&ObjectRef::new(&self.node))
            .and_then(|node| node.metadata.uid.clone())
            .ok_or_else(|| NodeStatusError::NoUid {
                node: self.node.clone(),
            })?;
        self.meshnodes
            .patch(
                &self.node,
                &Self::params(),
                &Patch::Apply(Self::object(&self.node, &uid)),
            )
            .await
            .map_err(|source| NodeStatusError::Create {
                node: self.node.clone(),
                source,
            })?;
        self.ensured = true;
        Ok(())
    }

    /// Applies `status` (creating the object first if needed).
    pub async fn write(&mut self, status: &MeshNodeStatus) -> Result<(), NodeStatusError> {
        if !self.ensured {
            self.ensure().await?;
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
        let object = NodeStatusWriter::object("node-1", "uid-1");
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
