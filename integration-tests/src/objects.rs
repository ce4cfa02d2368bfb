//! The Kubernetes side of the virtual cluster: Node and Pod objects as a kubelet and a CNI would
//! leave them (podCIDRs, InternalIP, podIPs, Ready), created by the admin since no kubelet runs.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};
use k8s_openapi::api::{
    authentication::v1::TokenRequest,
    core::v1::{Namespace, Node, Pod, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
};
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use serde::de::DeserializeOwned;
use serde_json::json;

/// A Kubernetes API call failed.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct ObjectsError {
    /// What was being done, e.g. `creating Node node-1`.
    pub what: String,
    /// The API error.
    #[source]
    pub source: kube::Error,
}

/// Name of the ClusterRole (and its binding) [`install_node_read_rbac`] creates.
pub const NODE_READ_ROLE: &str = "wiremesh-testbed-node-read";

fn typed<T: DeserializeOwned>(value: serde_json::Value) -> T {
    // The literals below are well-formed objects of type T; failing here is a bug in this file.
    serde_json::from_value(value)
        .unwrap_or_else(|e| panic!("object literal does not match its type: {e}"))
}

fn is_conflict(err: &kube::Error) -> bool {
    matches!(err, kube::Error::Api(status) if status.code == 409)
}

fn is_not_found(err: &kube::Error) -> bool {
    matches!(err, kube::Error::Api(status) if status.code == 404)
}

/// Creates `obj` unless an object of that name exists already.
async fn create_if_missing<K>(api: &Api<K>, obj: &K, what: String) -> Result<(), ObjectsError>
where
    K: kube::Resource + Clone + DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    match api.create(&PostParams::default(), obj).await {
        Ok(_) => Ok(()),
        Err(err) if is_conflict(&err) => Ok(()),
        Err(source) => Err(ObjectsError { what, source }),
    }
}

/// Makes sure `namespace` exists with a `default` ServiceAccount (normally made by
/// kube-controller-manager, which the test bed does not run; the ServiceAccount admission plugin
/// rejects pods without it).
pub async fn ensure_namespace(client: &Client, namespace: &str) -> Result<(), ObjectsError> {
    let ns: Namespace = typed(json!({"metadata": {"name": namespace}}));
    create_if_missing(
        &Api::<Namespace>::all(client.clone()),
        &ns,
        format!("creating Namespace {namespace}"),
    )
    .await?;
    let sa: ServiceAccount =
        typed(json!({"metadata": {"name": "default", "namespace": namespace}}));
    create_if_missing(
        &Api::<ServiceAccount>::namespaced(client.clone(), namespace),
        &sa,
        format!("creating ServiceAccount {namespace}/default"),
    )
    .await
}

/// Creates a Node with `spec.podCIDRs` and sets its status (InternalIP, Hostname, Ready) through the
/// status subresource, as the kubelet would.
pub async fn create_node(
    client: &Client,
    name: &str,
    pod_cidr: Ipv4Net,
    internal_ip: Ipv4Addr,
) -> Result<Node, ObjectsError> {
    create_node_with(client, name, &[pod_cidr.into()], &[internal_ip.into()]).await
}

/// [`create_node`] with any podCIDRs and InternalIPs (dual stack: one of each family, the
/// primary first).
pub async fn create_node_with(
    client: &Client,
    name: &str,
    pod_cidrs: &[IpNet],
    internal_ips: &[IpAddr],
) -> Result<Node, ObjectsError> {
    let api = Api::<Node>::all(client.clone());
    let cidrs: Vec<String> = pod_cidrs.iter().map(ToString::to_string).collect();
    let node: Node = typed(json!({
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}},
        "spec": {"podCIDR": cidrs.first(), "podCIDRs": cidrs},
    }));
    api.create(&PostParams::default(), &node)
        .await
        .map_err(|source| ObjectsError {
            what: format!("creating Node {name}"),
            source,
        })?;
    let mut addresses: Vec<serde_json::Value> = internal_ips
        .iter()
        .map(|ip| json!({"type": "InternalIP", "address": ip.to_string()}))
        .collect();
    addresses.push(json!({"type": "Hostname", "address": name}));
    let status = json!({"status": {
        "addresses": addresses,
        "conditions": [{
            "type": "Ready", "status": "True", "reason": "WiremeshTestbed",
            "message": "network namespace of the wiremesh virtual cluster",
        }],
    }});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .map_err(|source| ObjectsError {
            what: format!("setting the status of Node {name}"),
            source,
        })
}

/// Creates a Pod bound to `node` (no scheduler runs) and sets `status.podIP(s)`, `hostIP(s)`,
/// phase Running and Ready, as the kubelet would after the CNI gave the pod its address.
pub async fn create_pod(
    client: &Client,
    namespace: &str,
    name: &str,
    node: &str,
    pod_ip: Ipv4Addr,
    host_ip: Ipv4Addr,
) -> Result<Pod, ObjectsError> {
    create_pod_with(client, namespace, name, node, &[pod_ip.into()], host_ip).await
}

/// [`create_pod`] with any pod IPs (dual stack: one of each family, the primary first).
pub async fn create_pod_with(
    client: &Client,
    namespace: &str,
    name: &str,
    node: &str,
    pod_ips: &[IpAddr],
    host_ip: Ipv4Addr,
) -> Result<Pod, ObjectsError> {
    let api = Api::<Pod>::namespaced(client.clone(), namespace);
    let pod: Pod = typed(json!({
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": "wiremesh-testbed"}},
        "spec": {
            "nodeName": node,
            "automountServiceAccountToken": false,
            "terminationGracePeriodSeconds": 0,
            "containers": [{"name": "app", "image": "wiremesh.invalid/testbed-pod:none"}],
        },
    }));
    api.create(&PostParams::default(), &pod)
        .await
        .map_err(|source| ObjectsError {
            what: format!("creating Pod {namespace}/{name}"),
            source,
        })?;
    let status = json!({"status": {
        "phase": "Running",
        "podIP": pod_ips.first().map(ToString::to_string),
        "podIPs": pod_ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect::<Vec<_>>(),
        "hostIP": host_ip.to_string(),
        "hostIPs": [{"ip": host_ip.to_string()}],
        "conditions": [{"type": "Ready", "status": "True"}],
    }});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .map_err(|source| ObjectsError {
            what: format!("setting the status of Pod {namespace}/{name}"),
            source,
        })
}

/// The annotation `key` of Node `node`, if it has it.
pub async fn node_annotation(
    client: &Client,
    node: &str,
    key: &str,
) -> Result<Option<String>, ObjectsError> {
    let node_obj = Api::<Node>::all(client.clone())
        .get(node)
        .await
        .map_err(|source| ObjectsError {
            what: format!("reading Node {node}"),
            source,
        })?;
    Ok(node_obj
        .metadata
        .annotations
        .and_then(|mut a| a.remove(key)))
}

/// Deletes a Node; a missing one counts as deleted.
pub async fn delete_node(client: &Client, name: &str) -> Result<(), ObjectsError> {
    match Api::<Node>::all(client.clone())
        .delete(name, &DeleteParams::default())
        .await
    {
        Err(err) if !is_not_found(&err) => Err(ObjectsError {
            what: format!("deleting Node {name}"),
            source: err,
        }),
        _ => Ok(()),
    }
}

/// Deletes a Pod at once (grace period 0: no kubelet would ever confirm a graceful deletion).
pub async fn delete_pod(client: &Client, namespace: &str, name: &str) -> Result<(), ObjectsError> {
    let params = DeleteParams {
        grace_period_seconds: Some(0),
        ..DeleteParams::default()
    };
    match Api::<Pod>::namespaced(client.clone(), namespace)
        .delete(name, &params)
        .await
    {
        Err(err) if !is_not_found(&err) => Err(ObjectsError {
            what: format!("deleting Pod {namespace}/{name}"),
            source: err,
        }),
        _ => Ok(()),
    }
}

/// Lets every node user (group `system:nodes`) get, list and watch all Nodes, Pods, Namespaces,
/// NetworkPolicies and the wiremesh.io resources (the agent compiles NetworkPolicy itself), and
/// write `MeshNode` objects (each agent's live status).
///
/// The Node authorizer alone allows a node to read only its own Node object and to list pods only
/// with `fieldSelector=spec.nodeName=<itself>`; an agent that runs with its node's credentials and
/// watches every node needs these read grants in addition. Writes stay as the Node authorizer and
/// the NodeRestriction admission plugin allow: a node patches only its own Node.
pub async fn install_node_read_rbac(client: &Client) -> Result<(), ObjectsError> {
    let role: ClusterRole = typed(json!({
        "metadata": {"name": NODE_READ_ROLE},
        "rules": [
            {"apiGroups": [""], "resources": ["nodes", "pods", "namespaces"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["wiremesh.io"], "resources": ["*"], "verbs": ["get", "list", "watch"]},
            // Each agent's live status: its own MeshNode (RBAC cannot say "own"; the name is the
            // node's by convention, see docs/ARCHITECTURE.md "Per-node live status").
            {"apiGroups": ["wiremesh.io"], "resources": ["meshnodes", "meshnodes/status"], "verbs": ["create", "patch", "update"]},
        ],
    }));
    create_if_missing(
        &Api::<ClusterRole>::all(client.clone()),
        &role,
        format!("creating ClusterRole {NODE_READ_ROLE}"),
    )
    .await?;
    let binding: ClusterRoleBinding = typed(json!({
        "metadata": {"name": NODE_READ_ROLE},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": NODE_READ_ROLE},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:nodes"}],
    }));
    create_if_missing(
        &Api::<ClusterRoleBinding>::all(client.clone()),
        &binding,
        format!("creating ClusterRoleBinding {NODE_READ_ROLE}"),
    )
    .await
}

/// Name of the ClusterRole, Role and bindings of [`install_coordinator_rbac`].
pub const COORDINATOR_ROLE: &str = "wiremesh-rotation-coordinator";

/// Grants the ServiceAccount `namespace/service_account` what the rotation coordinator needs: the
/// Lease in `namespace` (get, create, patch: kube-lease-manager reads it and writes it with
/// server-side apply), Nodes' metadata (get, list, watch), MeshEncryptions (get, list, watch),
/// KeyRotations (get, list, watch; create for the schedule) and their status (get, update,
/// patch), Events (create, patch). The same grants the DaemonSet's RBAC
/// must ship. Node credentials cannot hold the Lease: NodeRestriction lets a node write only its
/// own Lease in `kube-node-lease`.
pub async fn install_coordinator_rbac(
    client: &Client,
    namespace: &str,
    service_account: &str,
) -> Result<(), ObjectsError> {
    let cluster_role: ClusterRole = typed(json!({
        "metadata": {"name": COORDINATOR_ROLE},
        "rules": [
            {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["wiremesh.io"], "resources": ["keyrotations"], "verbs": ["get", "list", "watch", "create"]},
            {"apiGroups": ["wiremesh.io"], "resources": ["meshencryptions"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["wiremesh.io"], "resources": ["keyrotations/status"], "verbs": ["get", "update", "patch"]},
            {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
        ],
    }));
    create_if_missing(
        &Api::<ClusterRole>::all(client.clone()),
        &cluster_role,
        format!("creating ClusterRole {COORDINATOR_ROLE}"),
    )
    .await?;
    let subjects =
        json!([{"kind": "ServiceAccount", "name": service_account, "namespace": namespace}]);
    let binding: ClusterRoleBinding = typed(json!({
        "metadata": {"name": COORDINATOR_ROLE},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": COORDINATOR_ROLE},
        "subjects": subjects,
    }));
    create_if_missing(
        &Api::<ClusterRoleBinding>::all(client.clone()),
        &binding,
        format!("creating ClusterRoleBinding {COORDINATOR_ROLE}"),
    )
    .await?;
    let role: Role = typed(json!({
        "metadata": {"name": COORDINATOR_ROLE, "namespace": namespace},
        "rules": [
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "patch"]},
        ],
    }));
    create_if_missing(
        &Api::<Role>::namespaced(client.clone(), namespace),
        &role,
        format!("creating Role {namespace}/{COORDINATOR_ROLE}"),
    )
    .await?;
    let role_binding: RoleBinding = typed(json!({
        "metadata": {"name": COORDINATOR_ROLE, "namespace": namespace},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": COORDINATOR_ROLE},
        "subjects": subjects,
    }));
    create_if_missing(
        &Api::<RoleBinding>::namespaced(client.clone(), namespace),
        &role_binding,
        format!("creating RoleBinding {namespace}/{COORDINATOR_ROLE}"),
    )
    .await
}

/// Creates the ServiceAccount `namespace/name` if missing and returns a bearer token for it (one
/// hour) from the TokenRequest API.
pub async fn service_account_token(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<String, ObjectsError> {
    let api = Api::<ServiceAccount>::namespaced(client.clone(), namespace);
    let account: ServiceAccount =
        typed(json!({"metadata": {"name": name, "namespace": namespace}}));
    create_if_missing(
        &api,
        &account,
        format!("creating ServiceAccount {namespace}/{name}"),
    )
    .await?;
    let request: TokenRequest =
        typed(json!({"spec": {"audiences": [], "expirationSeconds": 3600}}));
    let issued = api
        .create_token_request(name, &PostParams::default(), &request)
        .await
        .map_err(|source| ObjectsError {
            what: format!("requesting a token for ServiceAccount {namespace}/{name}"),
            source,
        })?;
    Ok(issued.status.and_then(|s| s.token).unwrap_or_default())
}
