//! The client certificate the API server presents to node endpoints it proxies (`nodes/proxy`),
//! as kube-apiserver's `--kubelet-client-certificate` does for kubelets: a CA of the cluster's
//! own and a client certificate it signed (CN `kube-apiserver-kubelet-client`, group
//! `system:masters`, as kubeadm issues it). Agents trust the CA with `--client-ca-file`, so a
//! request that reached them through the node proxy is authenticated as the API server, which
//! has already checked the caller's RBAC on `nodes/proxy`.

use std::path::{Path, PathBuf};

/// Where the files of [`generate`] live under a cluster's work dir.
pub fn dir(work_dir: &Path) -> PathBuf {
    work_dir.join("apiserver-proxy-client")
}

/// The CA bundle agents trust (`--client-ca-file`).
pub fn ca_file(work_dir: &Path) -> PathBuf {
    dir(work_dir).join("ca.crt")
}

/// Why the files could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ProxyPkiError {
    #[error("generate the API server's proxy client certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Writes the CA, the client certificate and its key (0600) under `work_dir`; returns the
/// kube-apiserver flags that make it present them.
pub fn generate(work_dir: &Path) -> Result<Vec<String>, ProxyPkiError> {
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "wiremesh test node-proxy CA");
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate()?;
    let mut client = rcgen::CertificateParams::new(Vec::<String>::new())?;
    client
        .distinguished_name
        .push(rcgen::DnType::CommonName, "kube-apiserver-kubelet-client");
    client
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "system:masters");
    let cert = client.signed_by(&key, &issuer)?;
    let d = dir(work_dir);
    let write = |name: &str, data: &str| -> Result<PathBuf, ProxyPkiError> {
        let path = d.join(name);
        crate::write_private_atomic(&path, data.as_bytes()).map_err(|source| {
            ProxyPkiError::Write {
                path: path.clone(),
                source,
            }
        })?;
        Ok(path)
    };
    std::fs::create_dir_all(&d).map_err(|source| ProxyPkiError::Write {
        path: d.clone(),
        source,
    })?;
    write("ca.crt", &ca_cert.pem())?;
    let cert_path = write("client.crt", &cert.pem())?;
    let key_path = write("client.key", &key.serialize_pem())?;
    Ok(vec![
        format!("--kubelet-client-certificate={}", cert_path.display()),
        format!("--kubelet-client-key={}", key_path.display()),
        // Node names do not resolve here; the proxy dials the InternalIP.
        "--kubelet-preferred-address-types=InternalIP".to_string(),
    ])
}
