//! Fuzzing entry points, shared by the cargo-fuzz targets in `keyexchange/fuzz/` and by the test
//! that replays the committed corpus, so `cargo test` runs exactly what the fuzzer runs.
//!
//! Each entry panics when an invariant breaks; that is how the fuzzer reports a finding.

use std::{collections::BTreeMap, net::IpAddr};

use crate::{
    annotations::{
        ANNOTATION_PUBLIC_KEY, AnnotationError, NodeAnnotations, RotationMark, parse_key,
        validate_public_key,
    },
    peers::{NodeView, desired_peers},
};

/// Longest `Display` of an [`AnnotationError`] we allow: Event messages must stay short however
/// long the hostile value is.
pub const MAX_MESSAGE_LEN: usize = 200;

/// The annotation parser on arbitrary bytes. Input format, one item per line (lossy UTF-8):
/// `@addr addr ...` adds node addresses; `key=value` sets an annotation (a key without `/` gets
/// the `wiremesh.io/` prefix); a line without `=` sets that key to the empty string.
///
/// Checks: no panic; an accepted node renders to annotations that parse back to the same value,
/// has a valid key and an endpoint among its addresses; a rejection has a CamelCase reason and a
/// short message; the peer set built from the node never panics and never contains a rejected
/// node. The peering parse (what the peer set uses) agrees with the strict one except for an
/// endpoint outside the node's addresses, which it replaces with one of them, never another.
pub fn annotations(data: &[u8]) {
    let (annotations, addresses) = decode(data);
    let parsed = NodeAnnotations::parse(&annotations, &addresses);
    match &parsed {
        Ok(node) => {
            let again = NodeAnnotations::parse(&node.render(), &addresses);
            assert_eq!(again.as_ref(), Ok(node), "render/parse round trip");
            assert!(validate_public_key(&node.public_key).is_ok());
            if let Some(next) = &node.next_public_key {
                assert!(validate_public_key(next).is_ok());
            }
            assert!(addresses.contains(&node.endpoint.ip()));
        }
        Err(error) => check_error(error),
    }
    if let Some(Err(error)) = annotations
        .get(crate::annotations::ANNOTATION_ROTATION)
        .map(|v| RotationMark::parse(v))
    {
        check_error(&error);
    }
    if let Some(Ok(mark)) = annotations
        .get(crate::annotations::ANNOTATION_ROTATION)
        .map(|v| RotationMark::parse(v))
    {
        assert_eq!(RotationMark::parse(&mark.to_string()), Ok(mark));
    }
    if let Some(value) = annotations.get(ANNOTATION_PUBLIC_KEY)
        && let Err(error) = parse_key(ANNOTATION_PUBLIC_KEY, value)
    {
        check_error(&error);
    }

    let peering = NodeAnnotations::parse_for_peering(&annotations, &addresses);
    match (&parsed, &peering) {
        (Ok(strict), Ok((node, moved))) => {
            assert_eq!(strict, node, "strict and peering parse agree");
            assert!(moved.is_empty(), "nothing moved: {moved:?}");
        }
        (Err(AnnotationError::EndpointNotNodeAddress { .. }), Ok((node, moved))) => {
            assert!(!moved.is_empty(), "a stale endpoint was replaced");
            for m in moved {
                assert!(addresses.contains(&m.used.ip()) && !addresses.contains(&m.annotated.ip()));
                assert_eq!(m.used.port(), m.annotated.port());
            }
            assert!(addresses.contains(&node.endpoint.ip()));
            assert!(
                node.next_endpoint
                    .is_none_or(|next| addresses.contains(&next.ip()))
            );
        }
        (Err(AnnotationError::EndpointNotNodeAddress { .. }), Err(error)) => check_error(error),
        (Err(strict), peering) => {
            assert_eq!(
                Err(strict),
                peering.as_ref().map(|(n, _)| n),
                "same rejection"
            );
        }
        (Ok(_), Err(error)) => panic!("accepted strictly, rejected for peering: {error}"),
    }

    let node = NodeView {
        name: "fuzzed".to_string(),
        annotations,
        addresses,
        pod_cidrs: vec!["10.244.1.0/24".parse().expect("literal")],
        pod_ips: Vec::new(),
        pod_ip_created: Default::default(),
    };
    let set = desired_peers("self", &[node]);
    match peering {
        Ok((_, moved)) => {
            assert_eq!(set.peers.len(), 1, "a valid node is a peer");
            assert_eq!(set.stale_endpoints.len(), moved.len());
        }
        Err(AnnotationError::NotPublished) => assert_eq!(set.pending, ["fuzzed"]),
        Err(_) => assert_eq!(set.rejected.len(), 1, "an invalid node is rejected"),
    }
}

fn check_error(error: &AnnotationError) {
    let message = error.to_string();
    assert!(
        message.len() <= MAX_MESSAGE_LEN,
        "message of {} bytes: {message}",
        message.len()
    );
    let reason = error.reason();
    assert!(
        reason.starts_with(|c: char| c.is_ascii_uppercase())
            && reason.chars().all(|c| c.is_ascii_alphanumeric()),
        "reason {reason:?} is not CamelCase"
    );
}

/// Splits fuzzer bytes into annotations and node addresses (see [`annotations`]).
pub fn decode(data: &[u8]) -> (BTreeMap<String, String>, Vec<IpAddr>) {
    let text = String::from_utf8_lossy(data);
    let mut annotations = BTreeMap::new();
    let mut addresses = Vec::new();
    for line in text.split('\n') {
        if let Some(list) = line.strip_prefix('@') {
            addresses.extend(
                list.split_whitespace()
                    .filter_map(|a| a.parse::<IpAddr>().ok()),
            );
            continue;
        }
        let (key, value) = line.split_once('=').unwrap_or((line, ""));
        if key.is_empty() {
            continue;
        }
        let key = if key.contains('/') {
            key.to_string()
        } else {
            format!("wiremesh.io/{key}")
        };
        annotations.insert(key, value.to_string());
    }
    (annotations, addresses)
}
