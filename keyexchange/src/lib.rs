//! wiremesh key exchange: key material, the Node annotation schema, the desired peer set and the
//! key-rotation state machine. Pure logic: no Kubernetes client, no sockets; the only I/O is the
//! keystore file.
#![forbid(unsafe_code)]

mod keys;

pub use keys::{KeyError, PrivateKey, PublicKey};
