//! The agents' identity in the virtual cluster, the way the DaemonSet gives it on a real cluster:
//! the ServiceAccount, RBAC and admission policies of `deploy/wiremesh.yaml` (applied from that file,
//! which is rendered from the Helm chart), a Pod object per node standing for the DaemonSet's pod, and
//! a kubeconfig with a ServiceAccount token bound to that Pod (TokenRequest with a `boundObjectRef`),
//! so every request of the agent carries its node (`authentication.kubernetes.io/node-name`).
//!
//! The agents therefore run with exactly the permissions an installed wiremesh has, not with node
//! credentials: a missing RBAC rule or an admission policy that rejects the agent's own writes fails
//! the mesh scenario tests.

use std::path::{Path, PathBuf};

use k8s_openapi::api::{
    authentication::v1::TokenRequest,
    core::v1::{Pod, ServiceAccount},
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, DynamicObject, Patch, PatchParams, PostParams},
    discovery::{self, Scope},
};
use serde::Deserialize;
use serde_json::json;

use crate::testenv::{TestenvCredentials, TestenvError, UserCredential};

/// Why the agent identity could not be installed or issued.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The manifest file could not be read.
    #[error("reading {path}: {source} (render it with `make deploy-manifests`)")]
    Read {
        /// The manifest.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A document of the manifest is not a Kubernetes object.
    #[error("{path}: document {index}: {source}")]
    Parse {
        /// The manifest.
        path: PathBuf,
        /// 0-based document index.
        index: usize,
        /// The YAML error.
        #[source]
        source: serde_yaml::Error,
    },
    /// An object has no apiVersion/kind the apiserver knows.
    #[error("{what}: {message}")]
    Kind {
        /// Which object.
        what: String,
        /// Why.
        message: String,
    },
    /// The manifest has no ServiceAccount (or several).
    #[error("{path}: expected exactly one ServiceAccount, found {found}")]
    ServiceAccount {
        /// The manifest.
        path: PathBuf,
        /// How many there are.
        found: usize,
    },
    /// A Kubernetes call failed.
    #[error("{what}: {source}")]
    Api {
        /// What was being done.
        what: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The TokenRequest came back without a token.
    #[error("{0} returned no token")]
    NoToken(String),
    /// A kubeconfig could not be written.
    #[error(transparent)]
    Kubeconfig(#[from] TestenvError),
}

/// Kinds of `deploy/wiremesh.yaml` the virtual cluster applies: the agent's identity and what limits
/// it. The DaemonSet is left out (no kubelet runs it; the harness starts the agents itself).
const APPLIED_KINDS: &[&str] = &[
    "ServiceAccount",
    "ClusterRole",
    "ClusterRoleBinding",
    "Role",
    "RoleBinding",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
];

/// Field manager of the harness's server-side applies.
const FIELD_MANAGER: &str = "wiremesh-testbed";

/// Lifetime asked for the agents' tokens: longer than any test or demo session (a kubelet would
/// refresh the projected token; the harness's agents read their kubeconfig once).
const TOKEN_SECONDS: i64 = 24 * 3600;

/// `deploy/wiremesh.yaml` of this checkout, or `$WIREMESH_DEPLOY_MANIFEST`.
pub fn default_manifest() -> PathBuf {
    std::env::var_os("WIREMESH_DEPLOY_MANIFEST")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/wiremesh.yaml"))
}

/// Every object of a multi-document YAML manifest file (empty documents skipped).
pub fn read_manifest(path: &Path) -> Result<Vec<DynamicObject>, IdentityError> {
    let text = std::fs::read_to_string(path).map_err(|source| IdentityError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_manifest(&text, path)
}

/// Every object of multi-document YAML `text` (empty documents skipped); `path` names its origin in
/// errors.
pub fn parse_manifest(text: &str, path: &Path) -> Result<Vec<DynamicObject>, IdentityError> {
    let parse = |index, source| IdentityError::Parse {
        path: path.to_owned(),
        index,
        source,
    };
    let mut objects = Vec::new();
    for (index, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = serde_yaml::Value::deserialize(doc).map_err(|e| parse(index, e))?;
        if value.is_null() {
            continue;
        }
        objects.push(serde_yaml::from_value(value).map_err(|e| parse(index, e))?);
    }
    Ok(objects)
}

/// The `kind` of a manifest object ("" when it has none).
pub fn kind_of(object: &DynamicObject) -> &str {
    object.types.as_ref().map_or("", |t| t.kind.as_str())
}

/// Server-side applies `object` (its resource is looked up through discovery).
pub async fn apply(client: &Client, object: &DynamicObject) -> Result<(), IdentityError> {
    let what = format!("applying {} {}", kind_of(object), object.name_any());
    let types = object.types.clone().ok_or_else(|| IdentityError::Kind {
        what: what.clone(),
        message: "no apiVersion/kind".to_owned(),
    })?;
    let gvk = kube::api::GroupVersionKind::try_from(&types).map_err(|e| IdentityError::Kind {
        what: what.clone(),
        message: e.to_string(),
    })?;
    let api_err = |source| IdentityError::Api {
        what: what.clone(),
        source,
    };
    let (resource, capabilities) = discovery::pinned_kind(client, &gvk)
        .await
        .map_err(api_err)?;
    let api: Api<DynamicObject> = match (capabilities.scope, object.namespace()) {
        (Scope::Namespaced, Some(ns)) => Api::namespaced_with(client.clone(), &ns, &resource),
        _ => Api::all_with(client.clone(), &resource),
    };
    api.patch(
        &object.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(object),
    )
    .await
    .map_err(api_err)?;
    Ok(())
}

/// The agents' ServiceAccount, as installed from the manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentIdentity {
    /// Namespace of the ServiceAccount and of the agent Pods.
    pub namespace: String,
    /// The ServiceAccount's name.
    pub service_account: String,
}

impl AgentIdentity {
    /// The user name the apiserver gives the agents.
    pub fn username(&self) -> String {
        format!(
            "system:serviceaccount:{}:{}",
            self.namespace, self.service_account
        )
    }

    /// The Pod object standing for the DaemonSet's pod on `node`.
    pub fn pod_name(&self, node: &str) -> String {
        format!("{}-{node}", self.service_account)
    }
}

/// The agents' ServiceAccount in `objects` (read from `manifest`): there must be exactly one.
pub fn identity_in(
    objects: &[DynamicObject],
    manifest: &Path,
) -> Result<AgentIdentity, IdentityError> {
    let accounts: Vec<&DynamicObject> = objects
        .iter()
        .filter(|o| kind_of(o) == "ServiceAccount")
        .collect();
    let [account] = accounts.as_slice() else {
        return Err(IdentityError::ServiceAccount {
            path: manifest.to_owned(),
            found: accounts.len(),
        });
    };
    Ok(AgentIdentity {
        namespace: account.namespace().unwrap_or_else(|| "default".to_owned()),
        service_account: account.name_any(),
    })
}

/// Applies the identity kinds of `manifest` (ServiceAccount, RBAC, admission policies) and returns
/// the ServiceAccount.
pub async fn install(client: &Client, manifest: &Path) -> Result<AgentIdentity, IdentityError> {
    let objects = read_manifest(manifest)?;
    let identity = identity_in(&objects, manifest)?;
    for object in objects
        .iter()
        .filter(|o| APPLIED_KINDS.contains(&kind_of(o)))
    {
        apply(client, object).await?;
    }
    tracing::info!(
        manifest = %manifest.display(),
        user = %identity.username(),
        "agent identity installed from the deploy manifest"
    );
    Ok(identity)
}

/// Creates a Pod named `name` bound to `node` and running as `service_account` (host network, as the
/// DaemonSet's pod) unless it exists, and returns it. No kubelet runs it: it exists so that tokens
/// can be bound to it.
pub async fn ensure_node_pod(
    client: &Client,
    namespace: &str,
    name: &str,
    service_account: &str,
    node: &str,
) -> Result<Pod, IdentityError> {
    let api = Api::<Pod>::namespaced(client.clone(), namespace);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": namespace, "labels": {
            "app.kubernetes.io/name": "wiremesh",
            "app.kubernetes.io/component": "agent",
        }},
        "spec": {
            "nodeName": node,
            "serviceAccountName": service_account,
            "hostNetwork": true,
            // No kubelet mounts it; the harness hands the token over in a kubeconfig.
            "automountServiceAccountToken": false,
            "terminationGracePeriodSeconds": 0,
            "containers": [{"name": "agent", "image": "wiremesh.invalid/mesh-agent:testbed"}],
        },
    }))
    .unwrap_or_else(|e| panic!("Pod literal does not match the Pod type: {e}"));
    let what = format!("creating Pod {namespace}/{name}");
    match api.create(&PostParams::default(), &pod).await {
        Ok(pod) => Ok(pod),
        Err(kube::Error::Api(status)) if status.code == 409 => api
            .get(name)
            .await
            .map_err(|source| IdentityError::Api { what, source }),
        Err(source) => Err(IdentityError::Api { what, source }),
    }
}

/// A token of ServiceAccount `namespace/service_account` bound to `pod` (which must exist and run as
/// that account): valid only while that Pod exists, and carrying the Pod's node.
pub async fn bound_token(
    client: &Client,
    namespace: &str,
    service_account: &str,
    pod: &Pod,
) -> Result<String, IdentityError> {
    let request: TokenRequest = serde_json::from_value(json!({
        "spec": {
            "audiences": [],
            "expirationSeconds": TOKEN_SECONDS,
            "boundObjectRef": {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": pod.name_any(),
                "uid": pod.uid(),
            },
        },
    }))
    .unwrap_or_else(|e| panic!("TokenRequest literal does not match its type: {e}"));
    let what = format!(
        "TokenRequest for {namespace}/{service_account} bound to Pod {}",
        pod.name_any()
    );
    let response: TokenRequest = Api::<ServiceAccount>::namespaced(client.clone(), namespace)
        .create_subresource("token", service_account, &PostParams::default(), &request)
        .await
        .map_err(|source| IdentityError::Api {
            what: what.clone(),
            source,
        })?;
    response
        .status
        .and_then(|s| s.token)
        .filter(|t| !t.is_empty())
        .ok_or(IdentityError::NoToken(what))
}

/// Writes a kubeconfig (mode 0600) for `user` with `token`, CA embedded.
pub fn write_token_kubeconfig(
    credentials: &TestenvCredentials,
    context: &str,
    user: &str,
    token: String,
    path: &Path,
) -> Result<(), IdentityError> {
    let user = UserCredential {
        user: user.to_owned(),
        groups: Vec::new(),
        token,
    };
    let yaml = credentials.kubeconfig_yaml(context, &user)?;
    crate::fsutil::write_private_atomic(path, yaml.as_bytes()).map_err(|source| {
        TestenvError::Io {
            what: "writing kubeconfig",
            path: path.to_owned(),
            source,
        }
    })?;
    Ok(())
}

/// Creates `node`'s agent Pod and writes a kubeconfig (mode 0600) with a token bound to it.
pub async fn write_agent_kubeconfig(
    client: &Client,
    identity: &AgentIdentity,
    credentials: &TestenvCredentials,
    node: &str,
    path: &Path,
) -> Result<(), IdentityError> {
    let pod = ensure_node_pod(
        client,
        &identity.namespace,
        &identity.pod_name(node),
        &identity.service_account,
        node,
    )
    .await?;
    let token = bound_token(client, &identity.namespace, &identity.service_account, &pod).await?;
    write_token_kubeconfig(credentials, node, &identity.username(), token, path)
}

/// Deletes `node`'s agent Pod (its tokens stop working), as the pod garbage collector does when a
/// Node goes away. A missing Pod counts as deleted.
pub async fn delete_agent_pod(
    client: &Client,
    identity: &AgentIdentity,
    node: &str,
) -> Result<(), IdentityError> {
    let name = identity.pod_name(node);
    let params = DeleteParams {
        grace_period_seconds: Some(0),
        ..DeleteParams::default()
    };
    match Api::<Pod>::namespaced(client.clone(), &identity.namespace)
        .delete(&name, &params)
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(source) => Err(IdentityError::Api {
            what: format!("deleting Pod {}/{name}", identity.namespace),
            source,
        }),
    }
}
