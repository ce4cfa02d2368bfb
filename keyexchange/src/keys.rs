//! X25519 key material. Private keys are zeroized on drop and never printed; public keys travel as
//! standard base64 (44 characters), the format of wg(8) and of the `wiremesh.io/public-key`
//! annotation.

use std::{fmt, str::FromStr};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use x25519_dalek::{PublicKey as DalekPublic, StaticSecret};
use zeroize::{Zeroize, Zeroizing};

/// Why a key could not be parsed or made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    /// Not standard base64 (with padding); the detail never quotes a private key's characters.
    #[error("key is not valid base64: {0}")]
    Base64(String),
    /// Decoded to the wrong number of bytes.
    #[error("key is {0} bytes long, want 32")]
    Length(usize),
    /// `getrandom` failed.
    #[error("the operating system random source failed: {0}")]
    Random(String),
}

/// A node's static X25519 secret. Zeroized on drop; `Debug` and `Display` never show it.
#[derive(Clone)]
pub struct PrivateKey(StaticSecret);

impl PrivateKey {
    /// A fresh key from the operating system's random source.
    pub fn generate() -> Result<Self, KeyError> {
        let mut bytes = Zeroizing::new([0u8; 32]);
        getrandom::fill(bytes.as_mut()).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(Self::from_bytes(*bytes))
    }

    /// Takes ownership of raw secret bytes (clamping happens inside the scalar multiplication).
    pub fn from_bytes(mut bytes: [u8; 32]) -> Self {
        let secret = StaticSecret::from(bytes);
        bytes.zeroize();
        Self(secret)
    }

    /// Parses the base64 form used by wg(8) and the keystore file.
    ///
    /// Errors never quote the input: a corrupt key file must not leak part of a secret into logs.
    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        let bytes = Zeroizing::new(decode32(text, Secrecy::Secret)?);
        Ok(Self::from_bytes(*bytes))
    }

    /// The secret as base64, for the keystore file and the wg(8) UAPI only. The result is zeroized
    /// when dropped.
    pub fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(STANDARD.encode(self.0.as_bytes()))
    }

    /// The raw secret, for handing to the WireGuard engine (boringtun has its own x25519 types).
    pub fn to_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.0.to_bytes())
    }

    /// The matching public key (X25519 base-point multiplication).
    pub fn public_key(&self) -> PublicKey {
        PublicKey(DalekPublic::from(&self.0).to_bytes())
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey(public={})", self.public_key())
    }
}

/// A node's X25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    /// Wraps raw bytes without validation; see `validate_public_key` for the point checks.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw 32 bytes (the Montgomery u-coordinate, little endian).
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Parses standard base64 of exactly 32 bytes. Validation of the point itself (all-zero,
    /// low-order) is the annotation schema's job.
    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        decode32(text, Secrecy::Public).map(Self)
    }

    /// Standard base64 with padding, 44 characters.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    /// A short, stable fingerprint for status output: the first 8 base64 characters.
    pub fn fingerprint(&self) -> String {
        self.to_base64()[..8].to_string()
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::from_base64(text)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_base64())
    }
}

/// Whether a decode error may quote the offending input byte.
#[derive(Clone, Copy)]
enum Secrecy {
    Public,
    Secret,
}

fn decode32(text: &str, secrecy: Secrecy) -> Result<[u8; 32], KeyError> {
    let bytes = Zeroizing::new(STANDARD.decode(text.trim()).map_err(|e| {
        KeyError::Base64(match secrecy {
            Secrecy::Public => e.to_string(),
            Secrecy::Secret => describe_without_input(&e),
        })
    })?);
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| KeyError::Length(bytes.len()))
}

/// A decode error with positions only: `DecodeError`'s own message includes the offending byte.
fn describe_without_input(error: &base64::DecodeError) -> String {
    match error {
        base64::DecodeError::InvalidByte(offset, _) => {
            format!("invalid character at offset {offset}")
        }
        base64::DecodeError::InvalidLength(len) => format!("invalid length {len}"),
        base64::DecodeError::InvalidLastSymbol(offset, _) => {
            format!("invalid last symbol at offset {offset}")
        }
        base64::DecodeError::InvalidPadding => "invalid padding".to_string(),
    }
}
