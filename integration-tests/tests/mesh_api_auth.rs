//! Issue 15, "Done when" 5: a request to an agent's flow API without valid credentials, or from
//! a user without RBAC on `nodes/proxy`, is refused — directly at the agent's HTTPS port and
//! through the API server's node proxy — while a user with that RBAC gets the flows; the
//! unauthenticated metrics port serves no flows.

#[path = "mesh_support/support.rs"]
mod support;

use k8s_openapi::api::{
    authentication::v1::TokenRequest,
    core::v1::ServiceAccount,
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use kube::api::{Api, PostParams};
use meshctl::agents::{Agents, get_with};
use serde_json::json;
use support::*;

const DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

/// `curl -sk` status code of `https://ip:port/path`, with an optional `Authorization` header.
fn curl_code(url: &str, token: Option<&str>) -> u16 {
    let mut cmd = std::process::Command::new("curl");
    cmd.args([
        "-sk",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--max-time",
        "10",
        url,
    ]);
    if let Some(t) = token {
        cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    let out = cmd.output().expect("curl runs (Debian package curl)");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("curl {url}: {out:?}"))
}

async fn service_account_token(
    cluster: &wiremesh_integration::VirtualCluster,
    name: &str,
) -> String {
    let ns = &cluster.pods()[0].namespace;
    let sas: Api<ServiceAccount> = Api::namespaced(cluster.client().clone(), ns);
    sas.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": name}})).unwrap(),
    )
    .await
    .expect("create service account");
    let request: TokenRequest =
        serde_json::from_value(json!({"spec": {"audiences": [], "expirationSeconds": 600}}))
            .unwrap();
    let token: TokenRequest = sas
        .create_subresource("token", name, &PostParams::default(), &request)
        .await
        .expect("token request");
    token.status.and_then(|s| s.token).expect("token")
}

/// A client of the cluster's API server that authenticates with `token`.
fn client_with_token(cluster: &wiremesh_integration::VirtualCluster, token: &str) -> kube::Client {
    let creds = cluster.testenv().expect("testenv").credentials();
    let mut config = kube::Config::new(creds.server.parse().expect("server URL"));
    use base64::Engine as _;
    let body: String = creds
        .ca_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let ca = base64::engine::general_purpose::STANDARD
        .decode(body)
        .expect("CA PEM");
    config.root_cert = Some(vec![ca]);
    config.auth_info.token = Some(token.to_string().into());
    kube::Client::try_from(config).expect("client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_flow_api_refuses_requests_without_credentials_or_rbac() {
    let Some(cluster) = start_mesh_or_skip(Shape::new(2, 1)).await else {
        return;
    };
    let ip = cluster.node("node-1").expect("node").network.underlay_ip;
    let direct = format!("https://{ip}:{}/flows", meshctl::agents::API_PORT);

    // Wait until the API answers at all (then: 401 without credentials).
    wiremesh_integration::wait::until(
        "the agent's API listener",
        DEADLINE,
        std::time::Duration::from_millis(200),
        || {
            let direct = direct.clone();
            async move {
                match curl_code(&direct, None) {
                    401 => Ok(()),
                    code => Err(format!("status {code}")),
                }
            }
        },
    )
    .await
    .expect("no credentials: 401");
    assert_eq!(
        curl_code(&direct, Some("forged-token")),
        401,
        "a forged token"
    );
    // The metrics port serves no flows.
    let metrics_flows = format!("http://{ip}:{}/flows", meshctl::demo::AGENT_HTTP_PORT);
    let code = std::process::Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &metrics_flows,
        ])
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&code.stdout), "404");

    // A service account without RBAC on nodes/proxy: refused by the agent (SubjectAccessReview)
    // and by the API server's node proxy.
    let token = service_account_token(&cluster, "no-node-proxy").await;
    assert_eq!(
        curl_code(&direct, Some(&token)),
        403,
        "authenticated, not authorised"
    );
    let unprivileged = Agents::new(client_with_token(&cluster, &token), Some(token.clone()));
    let err = unprivileged
        .get("node-1", "/flows")
        .await
        .expect_err("the node proxy refuses a user without nodes/proxy")
        .to_string();
    assert!(err.contains("403") || err.contains("forbidden"), "{err}");

    // Through the node proxy without the caller's token the agent refuses (the API server
    // strips Authorization and presents no identity on this port).
    let err = get_with(cluster.client(), None, "node-1", "/flows")
        .await
        .expect_err("no token for the agent")
        .to_string();
    assert!(err.contains("401"), "{err}");

    // The admin through the node proxy gets the flows.
    let body = agent_api(&cluster, "node-1", "/flows")
        .await
        .expect("admin");
    let json: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(json["node_name"], "node-1", "{body}");

    // RBAC on nodes/proxy opens it for the service account, directly and through the proxy.
    let role: ClusterRole = serde_json::from_value(json!({
        "metadata": {"name": "wiremesh-flow-reader-test"},
        "rules": [{"apiGroups": [""], "resources": ["nodes/proxy"], "verbs": ["get"]}]
    }))
    .unwrap();
    Api::<ClusterRole>::all(cluster.client().clone())
        .create(&PostParams::default(), &role)
        .await
        .expect("role");
    let binding: ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "wiremesh-flow-reader-test"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "wiremesh-flow-reader-test"},
        "subjects": [{"kind": "ServiceAccount", "name": "no-node-proxy", "namespace": cluster.pods()[0].namespace}]
    }))
    .unwrap();
    Api::<ClusterRoleBinding>::all(cluster.client().clone())
        .create(&PostParams::default(), &binding)
        .await
        .expect("binding");
    wiremesh_integration::wait::until(
        "RBAC on nodes/proxy takes effect",
        DEADLINE,
        std::time::Duration::from_millis(200),
        || {
            let direct = direct.clone();
            let token = token.clone();
            async move {
                match curl_code(&direct, Some(&token)) {
                    200 => Ok(()),
                    code => Err(format!("status {code}")),
                }
            }
        },
    )
    .await
    .expect("with RBAC: 200");
    unprivileged
        .get("node-1", "/flows")
        .await
        .expect("with RBAC, through the node proxy");
}
