//! Scanning text for secret key bytes: node private keys, preshared keys, the report signing
//! key. A [`KeyScanner`] is given the raw bytes of every secret and looks for them in every
//! encoding they could leak in: base64 (standard and URL-safe, padded or not, and at each of
//! the three alignments inside a longer base64 stream, which is how a key embedded in a DER
//! blob, a PEM body or a Secret's `data` shows up), and hex (lower and upper case). Tokens of
//! the text that are themselves base64 (a Secret's `data`, a JSON-embedded blob) are decoded
//! and scanned again, so base64 of base64 is found too.
//!
//! Used by the key-scan tests (`tests/key_scan.rs`, `tests/compliance_report.rs`); its unit
//! tests plant keys in each encoding to show the scan can fail.

use base64::{
    Engine,
    engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE_NO_PAD},
};

/// Shortest needle derived from a secret: a base64 fragment shorter than this could match by
/// chance (32 key bytes give ~40 characters at any alignment).
const MIN_NEEDLE: usize = 32;
/// Shortest base64 token decoded for a second look (a 32-byte key is 43 characters).
const MIN_TOKEN: usize = 40;

/// One secret found in one text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// The label of the secret (never its value).
    pub secret: String,
    /// Where: the name the text was scanned under, and "(decoded)" for a decoded token.
    pub place: String,
    /// Which encoding matched.
    pub encoding: &'static str,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}) in {}", self.secret, self.encoding, self.place)
    }
}

struct Needle {
    secret: usize,
    encoding: &'static str,
    text: String,
}

/// The secrets to look for and the needles derived from them.
#[derive(Default)]
pub struct KeyScanner {
    labels: Vec<String>,
    needles: Vec<Needle>,
    raw: Vec<(usize, Vec<u8>)>,
    scanned: usize,
}

impl KeyScanner {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a secret (at least 16 bytes): its needles in every encoding.
    pub fn add(&mut self, label: impl Into<String>, bytes: &[u8]) {
        assert!(bytes.len() >= 16, "a secret of {} bytes", bytes.len());
        let secret = self.labels.len();
        self.labels.push(label.into());
        let mut push = |encoding: &'static str, text: String| {
            if text.len() >= MIN_NEEDLE
                && !self
                    .needles
                    .iter()
                    .any(|n| n.secret == secret && n.text == text)
            {
                self.needles.push(Needle {
                    secret,
                    encoding,
                    text,
                });
            }
        };
        push("hex", hex(bytes, false));
        push("HEX", hex(bytes, true));
        push("base64", STANDARD.encode(bytes));
        push("base64url", URL_SAFE_NO_PAD.encode(bytes));
        // Inside a longer stream the key starts at byte offset 0, 1 or 2 of a 3-byte group:
        // encode it behind 0-2 filler bytes and keep only the characters that depend on key
        // bytes alone (whole groups).
        for shift in 0..3usize {
            let lead = (3 - shift) % 3;
            if bytes.len() <= lead + 3 {
                continue;
            }
            let inner = &bytes[lead..];
            let whole = inner.len() - inner.len() % 3;
            push(
                "base64 (in a stream)",
                STANDARD_NO_PAD.encode(&inner[..whole]),
            );
            push(
                "base64url (in a stream)",
                URL_SAFE_NO_PAD.encode(&inner[..whole]),
            );
        }
        self.raw.push((secret, bytes.to_vec()));
    }

    /// How many secrets are being looked for.
    pub fn secrets(&self) -> usize {
        self.labels.len()
    }

    /// How many texts (and decoded tokens) were scanned so far.
    pub fn scanned(&self) -> usize {
        self.scanned
    }

    /// Scans `text` (named `place` in findings); also decodes its base64 tokens and scans them.
    pub fn scan(&mut self, place: &str, text: &str) -> Vec<Finding> {
        self.scanned += 1;
        let mut found = self.scan_plain(place, text.as_bytes());
        for token in base64_tokens(text) {
            let decoded = STANDARD
                .decode(token)
                .or_else(|_| STANDARD_NO_PAD.decode(token.trim_end_matches('=')))
                .or_else(|_| URL_SAFE_NO_PAD.decode(token.trim_end_matches('=')));
            if let Ok(bytes) = decoded {
                let inner = format!("{place} (decoded)");
                for f in self.scan_plain(&inner, &bytes) {
                    if !found.contains(&f) {
                        found.push(f);
                    }
                }
            }
        }
        found
    }

    fn scan_plain(&self, place: &str, bytes: &[u8]) -> Vec<Finding> {
        let mut found = Vec::new();
        let mut hit = |secret: usize, encoding: &'static str| {
            let f = Finding {
                secret: self.labels[secret].clone(),
                place: place.to_string(),
                encoding,
            };
            if !found.contains(&f) {
                found.push(f);
            }
        };
        // The needles are ASCII: a lossy view keeps every ASCII run intact, and std's
        // substring search is fast even in a debug build.
        let text = String::from_utf8_lossy(bytes);
        for n in &self.needles {
            if text.contains(n.text.as_str()) {
                hit(n.secret, n.encoding);
            }
        }
        for (secret, raw) in &self.raw {
            if bytes.windows(raw.len()).any(|w| w == raw.as_slice()) {
                hit(*secret, "raw bytes");
            }
        }
        found
    }
}

fn hex(bytes: &[u8], upper: bool) -> String {
    bytes
        .iter()
        .map(|b| {
            if upper {
                format!("{b:02X}")
            } else {
                format!("{b:02x}")
            }
        })
        .collect()
}

/// Maximal runs of base64 characters (both alphabets, padding at the end) of at least
/// [`MIN_TOKEN`] characters.
fn base64_tokens(text: &str) -> Vec<&str> {
    let is_b64 = |c: char| c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '-' | '_' | '=');
    text.split(|c: char| !is_b64(c))
        .filter(|t| t.len() >= MIN_TOKEN)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 32] = [
        0x8a, 0x01, 0xfe, 0x33, 0x47, 0x90, 0x12, 0xcd, 0x5e, 0x6f, 0x70, 0x81, 0x92, 0xa3, 0xb4,
        0xc5, 0xd6, 0xe7, 0xf8, 0x09, 0x1a, 0x2b, 0x3c, 0x4d, 0x5e, 0x6f, 0x70, 0x81, 0x92, 0xa3,
        0xb4, 0xff,
    ];

    fn scanner() -> KeyScanner {
        let mut s = KeyScanner::new();
        s.add("node-1 private key", &KEY);
        s
    }

    fn encodings(s: &mut KeyScanner, text: &str) -> Vec<&'static str> {
        s.scan("t", text).into_iter().map(|f| f.encoding).collect()
    }

    #[test]
    fn finds_a_planted_key_in_every_encoding() {
        let mut s = scanner();
        let b64 = STANDARD.encode(KEY);
        assert!(!encodings(&mut s, &format!("key: {b64}\n")).is_empty());
        assert!(!encodings(&mut s, &format!("k={}", hex(&KEY, false))).is_empty());
        assert!(!encodings(&mut s, &format!("k={}", hex(&KEY, true))).is_empty());
        assert!(!encodings(&mut s, &URL_SAFE_NO_PAD.encode(KEY)).is_empty());
        // Inside a longer stream at each alignment (a DER blob's base64, a PEM body).
        for lead in 0..3usize {
            let mut blob = vec![0x30u8; lead];
            blob.extend_from_slice(&KEY);
            blob.extend_from_slice(&[7, 7, 7, 7]);
            let text = STANDARD.encode(&blob);
            assert!(
                !encodings(&mut s, &text).is_empty(),
                "key behind {lead} bytes: {text}"
            );
        }
        // A Secret's data: base64 of the base64 text.
        let double = STANDARD.encode(format!("private.key: {b64}\n"));
        let found = s.scan("secret", &format!("{{\"data\":{{\"k\":\"{double}\"}}}}"));
        assert!(!found.is_empty());
        assert!(
            found.iter().all(|f| f.place == "secret (decoded)"),
            "{found:?}"
        );
        assert!(found[0].to_string().contains("node-1 private key"));
        // Raw bytes in a binary text.
        let mut raw = b"prefix".to_vec();
        raw.extend_from_slice(&KEY);
        assert!(!s.scan_plain("raw", &raw).is_empty());
    }

    #[test]
    fn clean_text_and_other_keys_are_not_findings() {
        let mut s = scanner();
        let mut other = KEY;
        other[5] ^= 1;
        for text in [
            String::new(),
            "nothing to see".to_string(),
            STANDARD.encode(other),
            hex(&other, false),
            // The public key is not a secret.
            "p6n/mpyiChRZTsh2cc7m+iEQocNqT2YQqYIdns94rRI=".to_string(),
        ] {
            assert_eq!(s.scan("t", &text), vec![], "{text}");
        }
        assert_eq!(s.secrets(), 1);
        assert_eq!(s.scanned(), 5);
    }
}
