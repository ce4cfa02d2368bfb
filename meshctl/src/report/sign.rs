//! Signing and verifying report.json: an in-toto Statement (v1) whose subject is report.json
//! (its SHA-256) and whose predicate repeats the report's digest, window and summary, in a DSSE
//! envelope (`report.dsse.json`) signed with Ed25519 over DSSE's pre-authentication encoding.
//! The signing key is a PKCS#8 Ed25519 key: a file, or the Kubernetes Secret that
//! `meshctl report` creates on first use ([`SigningKey::from_secret_or_create`]); the public key
//! is a PEM `PUBLIC KEY` (SubjectPublicKeyInfo), as `openssl pkey -pubout` writes it.

use base64::Engine as _;
use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{Api, Client, api::PostParams};
use ring::{
    rand::SystemRandom,
    signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey},
};
use serde::{Deserialize, Serialize};

/// DSSE `payloadType` of an in-toto Statement.
pub const PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";
/// `_type` of an in-toto Statement v1.
pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
/// `predicateType` of the report's Statement.
pub const PREDICATE_TYPE: &str = "https://wiremesh.io/compliance-report/v1";
/// Keys of the signing Secret's data.
pub const SECRET_PRIVATE: &str = "ed25519.key";
pub const SECRET_PUBLIC: &str = "ed25519.pub";
/// The Secret `meshctl report` keeps its key in by default (`namespace/name`).
pub const DEFAULT_SECRET: &str = "kube-system/wiremesh-report-signing";

/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410), before the 32 key bytes.
const SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// What went wrong with a key or a signature; verification errors name the check that failed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("signing key {what}: {problem}")]
    Key { what: String, problem: String },
    #[error("signing Secret {secret}: {source}")]
    Secret {
        secret: String,
        #[source]
        source: kube::Error,
    },
    #[error("report.json is not JSON: {0}")]
    ReportJson(String),
    #[error(
        "digest: the report's body hashes to {computed} but its digest field says {claimed} (the report was changed after it was made)"
    )]
    Digest { claimed: String, computed: String },
    #[error("envelope: {0}")]
    Envelope(String),
    #[error(
        "signature: not made by the key {keyid} over this envelope (wrong key, or the envelope was changed)"
    )]
    Signature { keyid: String },
    #[error(
        "statement: the signed statement covers a report.json with sha256 {signed}, this file has sha256 {actual} (the file was changed or its digest recomputed after signing)"
    )]
    Subject { signed: String, actual: String },
    #[error("statement: the signed digest {signed} is not the report's digest {report}")]
    PredicateDigest { signed: String, report: String },
}

/// Hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, data).as_ref())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// DSSE's pre-authentication encoding: `"DSSEv1" SP LEN(type) SP type SP LEN(body) SP body`.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "DSSEv1 {} {payload_type} {} ",
        payload_type.len(),
        payload.len()
    )
    .into_bytes();
    out.extend_from_slice(payload);
    out
}

/// A DSSE envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    pub payload_type: String,
    /// Base64 (standard) of the Statement.
    pub payload: String,
    pub signatures: Vec<EnvelopeSignature>,
}

/// One DSSE signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvelopeSignature {
    /// Hex SHA-256 of the raw 32-byte public key.
    pub keyid: String,
    /// Base64 (standard) of the Ed25519 signature.
    pub sig: String,
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// An Ed25519 public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    /// From a PEM `PUBLIC KEY` (SubjectPublicKeyInfo).
    pub fn from_pem(text: &str, what: &str) -> Result<Self, SignError> {
        let err = |problem: &str| SignError::Key {
            what: what.to_string(),
            problem: problem.to_string(),
        };
        let der = mesh_agent::api::pem_block(text, "PUBLIC KEY")
            .ok_or_else(|| err("no PEM PUBLIC KEY block"))?;
        let raw = der
            .strip_prefix(&SPKI_PREFIX[..])
            .filter(|r| r.len() == 32)
            .ok_or_else(|| err("not an Ed25519 public key"))?;
        let mut key = [0u8; 32];
        key.copy_from_slice(raw);
        Ok(Self(key))
    }

    /// As a PEM `PUBLIC KEY`.
    pub fn to_pem(&self) -> String {
        let mut der = SPKI_PREFIX.to_vec();
        der.extend_from_slice(&self.0);
        pem("PUBLIC KEY", &der)
    }

    /// The DSSE keyid: hex SHA-256 of the raw key.
    pub fn keyid(&self) -> String {
        sha256_hex(&self.0)
    }
}

/// The private signing key.
pub struct SigningKey {
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey({})", self.public().keyid())
    }
}

impl SigningKey {
    /// A new key and its PKCS#8 PEM.
    pub fn generate() -> Result<(Self, String), SignError> {
        let err = |problem: String| SignError::Key {
            what: "generate".into(),
            problem,
        };
        let doc =
            Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|e| err(e.to_string()))?;
        let pem = pem("PRIVATE KEY", doc.as_ref());
        Ok((Self::from_pem(&pem, "generated")?, pem))
    }

    /// From a PEM `PRIVATE KEY` (PKCS#8 v1 or v2, as ring and `openssl genpkey -algorithm
    /// ed25519` write it).
    pub fn from_pem(text: &str, what: &str) -> Result<Self, SignError> {
        let err = |problem: String| SignError::Key {
            what: what.to_string(),
            problem,
        };
        let der = mesh_agent::api::pem_block(text, "PRIVATE KEY")
            .ok_or_else(|| err("no PEM PRIVATE KEY block".into()))?;
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der)
            .map_err(|e| err(format!("not a PKCS#8 Ed25519 key: {e}")))?;
        Ok(Self { pair })
    }

    /// The public half.
    pub fn public(&self) -> PublicKey {
        let mut key = [0u8; 32];
        key.copy_from_slice(self.pair.public_key().as_ref());
        PublicKey(key)
    }

    /// From the Secret `namespace/name`, created with a new key when it does not exist.
    pub async fn from_secret_or_create(client: &Client, secret: &str) -> Result<Self, SignError> {
        let (ns, name) = split_secret(secret)?;
        let api: Api<Secret> = Api::namespaced(client.clone(), ns);
        let wrap = |source| SignError::Secret {
            secret: secret.to_string(),
            source,
        };
        if let Some(s) = api.get_opt(name).await.map_err(wrap)? {
            return Self::from_secret(&s, secret);
        }
        let (key, private_pem) = Self::generate()?;
        let new: Secret = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": ns, "labels": {"app.kubernetes.io/part-of": "wiremesh"}},
            "type": "Opaque",
        }))
        .map_err(|e| SignError::Key {
            what: secret.to_string(),
            problem: e.to_string(),
        })?;
        let new = Secret {
            data: Some(
                [
                    (
                        SECRET_PRIVATE.to_string(),
                        ByteString(private_pem.into_bytes()),
                    ),
                    (
                        SECRET_PUBLIC.to_string(),
                        ByteString(key.public().to_pem().into_bytes()),
                    ),
                ]
                .into(),
            ),
            ..new
        };
        match api.create(&PostParams::default(), &new).await {
            Ok(_) => Ok(key),
            // Someone else created it first: use theirs.
            Err(kube::Error::Api(e)) if e.code == 409 => {
                let s = api.get(name).await.map_err(wrap)?;
                Self::from_secret(&s, secret)
            }
            Err(e) => Err(wrap(e)),
        }
    }

    fn from_secret(s: &Secret, what: &str) -> Result<Self, SignError> {
        let data = s
            .data
            .as_ref()
            .and_then(|d| d.get(SECRET_PRIVATE))
            .ok_or_else(|| SignError::Key {
                what: what.to_string(),
                problem: format!("no data key {SECRET_PRIVATE}"),
            })?;
        Self::from_pem(&String::from_utf8_lossy(&data.0), what)
    }

    /// Signs `report_bytes` (report.json as written) whose parsed digest is `digest`.
    pub fn sign(&self, report_bytes: &[u8], report: &super::Report) -> Envelope {
        let statement = serde_json::json!({
            "_type": STATEMENT_TYPE,
            "subject": [{"name": "report.json", "digest": {"sha256": sha256_hex(report_bytes)}}],
            "predicateType": PREDICATE_TYPE,
            "predicate": {
                "digest": report.digest,
                "generatedAt": report.generated_at,
                "window": report.window,
                "summary": report.summary,
            },
        });
        let payload = serde_json::to_vec(&statement).unwrap_or_default();
        let sig = self.pair.sign(&pae(PAYLOAD_TYPE, &payload));
        let b64 = base64::engine::general_purpose::STANDARD;
        Envelope {
            payload_type: PAYLOAD_TYPE.into(),
            payload: b64.encode(&payload),
            signatures: vec![EnvelopeSignature {
                keyid: self.public().keyid(),
                sig: b64.encode(sig.as_ref()),
            }],
        }
    }
}

fn split_secret(secret: &str) -> Result<(&str, &str), SignError> {
    secret
        .split_once('/')
        .filter(|(ns, name)| !ns.is_empty() && !name.is_empty())
        .ok_or_else(|| SignError::Key {
            what: secret.to_string(),
            problem: "expected namespace/name".into(),
        })
}

/// The public key in the Secret `namespace/name`.
pub async fn public_from_secret(client: &Client, secret: &str) -> Result<PublicKey, SignError> {
    let (ns, name) = split_secret(secret)?;
    let s = Api::<Secret>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .map_err(|source| SignError::Secret {
            secret: secret.to_string(),
            source,
        })?;
    let data = s
        .data
        .as_ref()
        .and_then(|d| d.get(SECRET_PUBLIC))
        .ok_or_else(|| SignError::Key {
            what: secret.to_string(),
            problem: format!("no data key {SECRET_PUBLIC}"),
        })?;
    PublicKey::from_pem(&String::from_utf8_lossy(&data.0), secret)
}

/// What a successful verification established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub digest: String,
    pub keyid: String,
}

/// Checks report.json (`report_bytes`) against its envelope and `key`, in order: the digest
/// field against the body, the envelope's type, the signature, the statement's subject against
/// the file, the statement's digest against the report's. The first failure is the error.
pub fn verify(
    report_bytes: &[u8],
    envelope_bytes: &[u8],
    key: &PublicKey,
) -> Result<Verified, SignError> {
    let report: serde_json::Value =
        serde_json::from_slice(report_bytes).map_err(|e| SignError::ReportJson(e.to_string()))?;
    let claimed = report["digest"].as_str().unwrap_or_default().to_string();
    let computed = super::digest_of_value(&report);
    if claimed != computed {
        return Err(SignError::Digest { claimed, computed });
    }
    let envelope: Envelope = serde_json::from_slice(envelope_bytes)
        .map_err(|e| SignError::Envelope(format!("not a DSSE envelope: {e}")))?;
    if envelope.payload_type != PAYLOAD_TYPE {
        return Err(SignError::Envelope(format!(
            "payloadType {:?}, expected {PAYLOAD_TYPE:?}",
            envelope.payload_type
        )));
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let payload = b64
        .decode(&envelope.payload)
        .map_err(|e| SignError::Envelope(format!("payload is not base64: {e}")))?;
    let keyid = key.keyid();
    let signed = envelope.signatures.iter().any(|s| {
        b64.decode(&s.sig).is_ok_and(|sig| {
            UnparsedPublicKey::new(&ED25519, &key.0)
                .verify(&pae(&envelope.payload_type, &payload), &sig)
                .is_ok()
        })
    });
    if !signed {
        return Err(SignError::Signature { keyid });
    }
    let statement: serde_json::Value = serde_json::from_slice(&payload)
        .map_err(|e| SignError::Envelope(format!("the statement is not JSON: {e}")))?;
    if statement["_type"] != STATEMENT_TYPE || statement["predicateType"] != PREDICATE_TYPE {
        return Err(SignError::Envelope(format!(
            "not a wiremesh report statement (_type {}, predicateType {})",
            statement["_type"], statement["predicateType"]
        )));
    }
    let signed_sha = statement["subject"][0]["digest"]["sha256"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let actual = sha256_hex(report_bytes);
    if signed_sha != actual {
        return Err(SignError::Subject {
            signed: signed_sha,
            actual,
        });
    }
    let signed_digest = statement["predicate"]["digest"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if signed_digest != computed {
        return Err(SignError::PredicateDigest {
            signed: signed_digest,
            report: computed,
        });
    }
    Ok(Verified {
        digest: computed,
        keyid,
    })
}
