//! wiremesh key exchange: key material, the on-disk keystore, the Node annotation schema, the
//! desired peer set and the key-rotation state machine. Pure logic: no Kubernetes client, no
//! sockets; the only I/O is the keystore directory.
#![forbid(unsafe_code)]

pub mod annotations;
pub mod claims;
pub mod fuzzing;
mod keys;
pub mod keystore;
pub mod peers;
pub mod rotation;

pub use annotations::{
    ANNOTATION_ENDPOINT, ANNOTATION_KEY_GENERATION, ANNOTATION_NEXT_PUBLIC_KEY,
    ANNOTATION_PUBLIC_KEY, ANNOTATION_ROTATION, AnnotationError, DEFAULT_LISTEN_PORT, KeyProblem,
    MovedEndpoint, NodeAnnotations, RotationMark, RotationStep, endpoint_on_node,
};
pub use claims::{AddressPolicy, ClaimError, ClaimKind};
pub use keys::{KeyError, PrivateKey, PublicKey};
pub use keystore::{KeySet, KeySource, Keystore, KeystoreError, LoadOutcome, PermissionFix};
pub use peers::{
    ConflictWith, DesiredPeer, NodeView, PeerSet, PodClaims, PrefixConflict, RejectReason,
    RejectedNode, StaleEndpoint, desired_peers, desired_peers_with_claims,
    desired_peers_with_local_keys, pod_claims,
};
pub use rotation::{
    Failure, FailureReason, RotationError, RotationPhase, RotationPlan,
    agent::{
        AgentAction, AgentInput, AgentPlan, KeystoreStep, LocalKeys, PeerObservation, RotationView,
        Stall, observe_peers,
    },
    controller::{ControllerInput, ControllerOutcome, PhaseCounts},
};
