use std::sync::Mutex;

use rustls::{
    ClientConfig, DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::ServerName,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::{drain, metrics::Metrics};

/// Tokens and the users they stand for; users allowed on nodes/proxy.
struct FakeReviewer {
    tokens: BTreeMap<String, User>,
    allowed: Vec<String>,
    asked: Mutex<Vec<(String, String, String)>>,
}

impl Reviewer for FakeReviewer {
    fn authenticate(&self, token: String) -> BoxFuture<'static, Result<Option<User>, String>> {
        let user = self.tokens.get(&token).cloned();
        Box::pin(async move { Ok(user) })
    }

    fn authorize(
        &self,
        user: User,
        verb: String,
        node: String,
    ) -> BoxFuture<'static, Result<bool, String>> {
        let ok = self.allowed.contains(&user.username);
        self.asked.lock().unwrap().push((user.username, verb, node));
        Box::pin(async move { Ok(ok) })
    }
}

/// Accepts any server certificate (the API server's node proxy does the same without
/// `--kubelet-certificate-authority`).
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

async fn get(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
    client_cert: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
) -> Result<(u16, String), String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)));
    let config = match client_cert {
        Some((cert, key)) => builder.with_client_auth_cert(vec![cert], key).unwrap(),
        None => builder.with_no_client_auth(),
    };
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n").as_bytes(),
    )
    .await
    .map_err(|e| e.to_string())?;
    let mut text = String::new();
    // A refused client certificate surfaces as an alert on the first read (TLS 1.3).
    tls.read_to_string(&mut text)
        .await
        .map_err(|e| e.to_string())?;
    let code = text
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status line: {text:?}"))?;
    let body = text
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    Ok((code, body))
}

/// The status code of `GET path` with one extra header line.
async fn get_with_header(addr: SocketAddr, path: &str, header: &str) -> u16 {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\n{header}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut text = String::new();
    tls.read_to_string(&mut text).await.unwrap();
    text[9..12].parse().unwrap()
}

fn user(name: &str, groups: &[&str]) -> User {
    User {
        username: name.into(),
        groups: groups.iter().map(|g| g.to_string()).collect(),
        ..User::default()
    }
}

/// A CA and a client certificate it signed for `cn` in group `o`, as PEM and DER.
fn client_ca(cn: &str, o: &str) -> (String, CertificateDer<'static>, PrivateKeyDer<'static>) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, o);
    let cert = params.signed_by(&key, &issuer).unwrap();
    (
        ca_cert.pem(),
        cert.der().clone(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
}

#[test]
fn client_certificate_subjects_name_the_user_and_groups() {
    let (_, der, _) = client_ca("kube-apiserver-kubelet-client", "system:masters");
    assert_eq!(
        cert_user(der.as_ref()),
        Some(user("kube-apiserver-kubelet-client", &["system:masters"]))
    );
    assert_eq!(cert_user(b"\x30\x03\x02\x01\x00"), None);
    assert_eq!(cert_user(b""), None);
}

#[tokio::test]
async fn every_request_is_authenticated_and_authorised_on_nodes_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let (ca_pem, good_cert, good_key) = client_ca("proxy", "system:masters");
    let (_, stranger_cert, stranger_key) = client_ca("proxy", "system:masters");
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, ca_pem).unwrap();
    let reviewer = Arc::new(FakeReviewer {
        tokens: [
            (
                "admin-token".to_string(),
                user("admin", &["system:masters"]),
            ),
            ("viewer-token".to_string(), user("viewer", &[])),
        ]
        .into_iter()
        .collect(),
        allowed: vec!["admin".into(), "proxy".into()],
        asked: Mutex::new(Vec::new()),
    });
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Metrics::new(&mut registry);
    let flows =
        crate::flowsource::FlowSource::new(8, std::time::Duration::from_secs(300), metrics.clone());
    flows.ingest(&[wiremesh_bpf::FlowEvent {
        packets: 3,
        src_ip: [10, 244, 1, 11],
        dst_ip: [10, 244, 2, 11],
        protocol: 6,
        verdict: 3,
        hook: 1,
        ..Default::default()
    }]);
    let state = ApiState {
        node_name: "node-1".into(),
        flows: Arc::new(flows),
        status: SharedStatus::default(),
        reviewer: reviewer.clone(),
        metrics,
        key_file: Some(dir.path().join(crate::api::CERT_FILE)),
    };
    let server = ApiServer::bind(
        "127.0.0.1:0".parse().unwrap(),
        dir.path(),
        Some(&ca_path),
        state,
    )
    .await
    .unwrap();
    let addr = server.local_addr();
    let (trigger, drain) = drain::channel();
    let task = tokio::spawn(server.run(drain));

    // No credentials, an unknown token: 401 and nothing about flows.
    let (code, body) = get(addr, "/flows", None, None).await.unwrap();
    assert_eq!(code, 401, "{body}");
    assert!(!body.contains("10.244"), "{body}");
    assert_eq!(
        get(addr, "/flows", Some("forged"), None).await.unwrap().0,
        401
    );
    // Authenticated, but no RBAC on nodes/proxy: 403.
    let (code, body) = get(addr, "/flows", Some("viewer-token"), None)
        .await
        .unwrap();
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("viewer"), "{body}");
    // The token in the header the node proxy passes on.
    assert_eq!(
        get_with_header(
            addr,
            "/flows",
            &format!("{TOKEN_HEADER}: Bearer viewer-token")
        )
        .await,
        403
    );
    assert_eq!(
        get_with_header(
            addr,
            "/flows",
            &format!("{TOKEN_HEADER}: Bearer admin-token")
        )
        .await,
        200
    );
    // Allowed: the flows.
    let (code, body) = get(addr, "/flows", Some("admin-token"), None)
        .await
        .unwrap();
    assert_eq!(code, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        json["flows"][0]["wiremesh_verdict"], "dropped-policy",
        "{body}"
    );
    assert_eq!(json["node_name"], "node-1");
    let key_written = json["key_created_at"].as_u64().expect("the key file's age");
    assert!(key_written <= json["now"].as_u64().unwrap(), "{body}");
    // The API server's client certificate: no token needed.
    let (code, _) = get(addr, "/flows", None, Some((good_cert, good_key)))
        .await
        .unwrap();
    assert_eq!(code, 200);
    // A certificate from another CA is refused in the handshake.
    assert!(
        get(addr, "/flows", None, Some((stranger_cert, stranger_key)))
            .await
            .is_err()
    );
    // No status yet, history not configured: still only after authentication.
    assert_eq!(
        get(addr, "/status", Some("admin-token"), None)
            .await
            .unwrap()
            .0,
        503
    );
    assert_eq!(get(addr, "/status", None, None).await.unwrap().0, 401);
    assert_eq!(
        get(addr, "/flows?since=0", Some("admin-token"), None)
            .await
            .unwrap()
            .0,
        404
    );
    let asked = reviewer.asked.lock().unwrap().clone();
    assert!(
        asked.contains(&("viewer".into(), "get".into(), "node-1".into())),
        "{asked:?}"
    );
    assert!(
        asked.contains(&("proxy".into(), "get".into(), "node-1".into())),
        "{asked:?}"
    );

    // The serving certificate is kept (0600 key) and reused.
    let key_mode = std::fs::metadata(dir.path().join(KEY_FILE)).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(key_mode.permissions().mode() & 0o777, 0o600);
    let first = std::fs::read(dir.path().join(CERT_FILE)).unwrap();
    let (again, _) = serving_cert(dir.path(), &["x".into()]).unwrap();
    assert_eq!(
        pem_block(&String::from_utf8(first).unwrap(), "CERTIFICATE").unwrap(),
        again.to_vec()
    );

    trigger.start();
    tokio::time::timeout(std::time::Duration::from_secs(5), task)
        .await
        .expect("server stops on drain")
        .unwrap()
        .unwrap();
}
