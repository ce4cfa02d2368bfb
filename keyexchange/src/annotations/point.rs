//! Which 32-byte strings are acceptable X25519 public keys for a peer.
//!
//! X25519 (RFC 7748) reads a public key as a u-coordinate mod p = 2^255 - 19 and ignores the top
//! bit. Points of small order (the 8-torsion of the curve and of its twist) give an all-zero or
//! predictable shared secret, so a peer publishing one would make every handshake with it
//! meaningless. They are exactly the u-coordinates 0, 1, p - 1 and two order-8 points; each also
//! has non-canonical spellings (top bit set, or u + p for u < 19). We reject those as low order,
//! and every other non-canonical spelling too: no honest implementation produces one, and two
//! spellings of one key would slip past the duplicate-key check of the peer set.

/// Why a public key is unusable. The Event reason of each is [`KeyProblem::reason`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyProblem {
    /// Not standard, padded base64.
    #[error("not valid base64")]
    Encoding,
    /// Decodes to this many bytes instead of 32.
    #[error("decodes to {0} bytes, want 32")]
    Length(usize),
    /// 32 zero bytes (the usual "unset" value).
    #[error("all-zero key")]
    AllZero,
    /// A point of small order (or a non-canonical spelling of one).
    #[error("low-order point")]
    LowOrder,
    /// Top bit set or u >= p: a second spelling of some other key.
    #[error("non-canonical encoding")]
    NonCanonical,
}

impl KeyProblem {
    /// The Kubernetes Event reason.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Encoding => "InvalidKeyEncoding",
            Self::Length(_) => "InvalidKeyLength",
            Self::AllZero => "ZeroPublicKey",
            Self::LowOrder => "LowOrderPublicKey",
            Self::NonCanonical => "NonCanonicalPublicKey",
        }
    }
}

/// The canonical little-endian u-coordinates of the small-order points (libsodium's blocklist,
/// cross-checked in the tests against curve25519-dalek's 8-torsion and the X25519 function).
pub(crate) const SMALL_ORDER: [[u8; 32]; 5] = [
    // 0: order 4 on the curve (and 2 on the twist)
    [0; 32],
    // 1: order 4
    {
        let mut u = [0u8; 32];
        u[0] = 1;
        u
    },
    // order 8
    [
        0xe0, 0xeb, 0x7a, 0x7c, 0x3b, 0x41, 0xb8, 0xae, 0x16, 0x56, 0xe3, 0xfa, 0xf1, 0x9f, 0xc4,
        0x6a, 0xda, 0x09, 0x8d, 0xeb, 0x9c, 0x32, 0xb1, 0xfd, 0x86, 0x62, 0x05, 0x16, 0x5f, 0x49,
        0xb8, 0x00,
    ],
    // order 8
    [
        0x5f, 0x9c, 0x95, 0xbc, 0xa3, 0x50, 0x8c, 0x24, 0xb1, 0xd0, 0xb1, 0x55, 0x9c, 0x83, 0xef,
        0x5b, 0x04, 0x44, 0x5c, 0xc4, 0x58, 0x1c, 0x8e, 0x86, 0xd8, 0x22, 0x4e, 0xdd, 0xd0, 0x9f,
        0x11, 0x57,
    ],
    // p - 1: order 4 on the twist
    [
        0xec, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0x7f,
    ],
];

/// Checks that `key` is a canonical X25519 public key of large order.
pub fn validate_public_key(key: &crate::PublicKey) -> Result<(), KeyProblem> {
    let bytes = key.as_bytes();
    if bytes.iter().all(|b| *b == 0) {
        return Err(KeyProblem::AllZero);
    }
    let reduced = reduce(bytes);
    if SMALL_ORDER.contains(&reduced) {
        return Err(KeyProblem::LowOrder);
    }
    if reduced != *bytes {
        return Err(KeyProblem::NonCanonical);
    }
    Ok(())
}

/// The u-coordinate X25519 actually uses: top bit cleared, then reduced mod p. Values in
/// [p, 2^255) are the only ones that need the subtraction, and all of them are p + (0..19).
pub(crate) fn reduce(bytes: &[u8; 32]) -> [u8; 32] {
    let mut u = *bytes;
    u[31] &= 0x7f;
    let at_least_p = u[31] == 0x7f && u[1..31].iter().all(|b| *b == 0xff) && u[0] >= 0xed;
    if at_least_p {
        let low = u[0] - 0xed;
        u = [0; 32];
        u[0] = low;
    }
    u
}
