//! deploy/ and the rendered Helm chart applied for real to testenv with server-side apply (every
//! object accepted), and the agent's permissions as
//! `kubectl auth can-i --as system:serviceaccount:...` reports them: what it needs, and not more.

#[path = "deploy_support/support.rs"]
mod support;

use k8s_openapi::api::authorization::v1::SubjectAccessReview;
use kube::{Api, api::PostParams};
use serde_json::json;
use support::*;

const AGENT: &str = "system:serviceaccount:kube-system:wiremesh-agent";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kustomization_and_chart_apply_server_side() {
    let env = Env::start("deploy-apply", &[]).await;
    let kubeconfig = env.kubeconfig();

    // deploy/ as docs/install.md says: every object kubectl renders is applied.
    let rendered = kubectl(
        &kubeconfig,
        &["kustomize", deploy_dir().to_str().expect("utf-8")],
    );
    let want = yaml_docs(&rendered).len() + 1; // + deploy/meshencryption.yaml
    let applied = apply_deploy_dir(&kubeconfig);
    assert_eq!(applied.len(), want, "applied: {applied:?}");
    // Everything is there afterwards.
    let listed = kubectl(
        &kubeconfig,
        &[
            "get",
            "-k",
            deploy_dir().to_str().expect("utf-8"),
            "-o",
            "name",
        ],
    );
    assert_eq!(listed.lines().count(), want - 1, "{listed}");

    // The chart rendered for another release and namespace, with non-default values, next to it.
    kubectl(&kubeconfig, &["create", "namespace", "wiremesh-alt"]);
    let chart = helm_template(
        "alt",
        "wiremesh-alt",
        &[
            "--set",
            "meshEncryption.create=false,meshEncryption.datapath=Kernel,meshEncryption.mtu=1380",
        ],
    );
    let file = env.dir.join("alt.yaml");
    std::fs::write(&file, &chart).expect("write rendered chart");
    let applied = applied_names(&kubectl(
        &kubeconfig,
        &[
            "apply",
            "--server-side",
            "-f",
            file.to_str().expect("utf-8"),
        ],
    ));
    assert_eq!(applied.len(), yaml_docs(&chart).len(), "{applied:?}");

    // A second apply of the same files changes nothing and conflicts with nothing.
    let again = apply_deploy_dir(&kubeconfig);
    assert_eq!(again.len(), want);

    // (The policies' CEL is evaluated for real in deploy_admission.rs: testenv runs no
    // kube-controller-manager, whose controller would fill status.typeChecking.)
}

/// The agent's permissions: `kubectl auth can-i VERB RESOURCE --as <agent>` for each row.
const TABLE: &[(&str, &str, bool)] = &[
    // Key exchange: every Node is read through a watch, only patch writes (own node: admission).
    ("list", "nodes", true),
    ("watch", "nodes", true),
    ("patch", "nodes", true),
    ("get", "nodes", false),
    ("update", "nodes", false),
    ("create", "nodes", false),
    ("delete", "nodes", false),
    ("patch", "nodes/status", false),
    ("get", "nodes/proxy", false),
    // Pods and namespaces: read only.
    ("list", "pods", true),
    ("watch", "pods", true),
    ("create", "pods", false),
    ("delete", "pods", false),
    ("create", "pods/exec", false),
    ("list", "namespaces", true),
    ("watch", "namespaces", true),
    ("list", "networkpolicies.networking.k8s.io", true),
    ("watch", "networkpolicies.networking.k8s.io", true),
    ("patch", "networkpolicies.networking.k8s.io", false),
    // Mesh settings and rotations: read only.
    ("get", "meshencryptions.wiremesh.io", true),
    ("list", "meshencryptions.wiremesh.io", true),
    ("watch", "meshencryptions.wiremesh.io", true),
    ("patch", "meshencryptions.wiremesh.io", false),
    ("update", "meshencryptions.wiremesh.io", false),
    ("list", "keyrotations.wiremesh.io", true),
    ("watch", "keyrotations.wiremesh.io", true),
    ("create", "keyrotations.wiremesh.io", false),
    ("delete", "keyrotations.wiremesh.io", false),
    // Events about bad peers and policies.
    ("create", "events.events.k8s.io", true),
    ("patch", "events.events.k8s.io", true),
    ("delete", "events.events.k8s.io", false),
    ("create", "events", false),
    // The API listener's authentication and authorisation of callers.
    ("create", "tokenreviews.authentication.k8s.io", true),
    ("create", "subjectaccessreviews.authorization.k8s.io", true),
    // Never: secrets, configmaps, RBAC, admission, CRDs, DaemonSets, impersonation.
    ("get", "secrets", false),
    ("list", "secrets", false),
    ("list", "configmaps", false),
    ("create", "serviceaccounts/token", false),
    ("patch", "clusterroles.rbac.authorization.k8s.io", false),
    (
        "create",
        "clusterrolebindings.rbac.authorization.k8s.io",
        false,
    ),
    (
        "delete",
        "validatingadmissionpolicies.admissionregistration.k8s.io",
        false,
    ),
    (
        "delete",
        "validatingadmissionpolicybindings.admissionregistration.k8s.io",
        false,
    ),
    (
        "update",
        "customresourcedefinitions.apiextensions.k8s.io",
        false,
    ),
    ("patch", "daemonsets.apps", false),
    ("impersonate", "users", false),
    ("create", "leases.coordination.k8s.io", false),
];

/// MeshNode rows: (verb, subresource, allowed). Asked with a SubjectAccessReview (the question
/// `kubectl auth can-i` asks) because kubectl cannot name a resource whose CRD is not installed,
/// and the MeshNode CRD may not be.
const MESHNODE_TABLE: &[(&str, &str, bool)] = &[
    ("get", "", true),
    ("create", "", true),
    ("update", "", true),
    ("patch", "", true),
    ("update", "status", true),
    ("patch", "status", true),
    ("list", "", false),
    ("watch", "", false),
    ("delete", "", false),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_can_do_what_it_needs_and_not_more() {
    let env = Env::start("deploy-rbac", &[]).await;
    let kubeconfig = env.kubeconfig();
    apply_deploy_dir(&kubeconfig);

    let mut wrong = Vec::new();
    for (verb, resource, want) in TABLE {
        let (resource, sub) = match resource.split_once('/') {
            Some((r, s)) if !r.contains('.') => (r, Some(s)),
            _ => (*resource, None),
        };
        let mut args = vec!["auth", "can-i", verb, resource, "--as", AGENT];
        let sub_flag;
        if let Some(s) = sub {
            sub_flag = format!("--subresource={s}");
            args.push(&sub_flag);
        }
        // can-i exits 1 for "no": read the answer, not the status.
        let out = std::process::Command::new(kubectl_path())
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(&args)
            .output()
            .expect("run kubectl");
        let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !stderr.contains("doesn't have a resource type"),
            "kubectl does not know {resource}: {stderr}"
        );
        let got = match answer.as_str() {
            "yes" => true,
            "no" => false,
            other => panic!("kubectl auth can-i {verb} {resource}: {other:?} / {stderr}"),
        };
        eprintln!("{verb:>12} {resource:<60} {answer}");
        if got != *want {
            wrong.push(format!("{verb} {resource}: got {answer}"));
        }
    }

    let reviews: Api<SubjectAccessReview> = Api::all(env.admin().await);
    for (verb, sub, want) in MESHNODE_TABLE {
        let review: SubjectAccessReview = serde_json::from_value(json!({
            "spec": {"user": AGENT, "groups": ["system:serviceaccounts", "system:authenticated"],
                     "resourceAttributes": {"group": "wiremesh.io", "resource": "meshnodes",
                                            "subresource": sub, "verb": verb, "name": "node-1"}},
        }))
        .expect("SubjectAccessReview literal");
        let got = reviews
            .create(&PostParams::default(), &review)
            .await
            .expect("SubjectAccessReview")
            .status
            .expect("status")
            .allowed;
        eprintln!("{verb:>12} meshnodes.wiremesh.io/{sub:<40} {got}");
        if got != *want {
            wrong.push(format!("{verb} meshnodes/{sub}: got {got}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "agent permissions differ from the table: {wrong:#?}"
    );
}
