//! Tests of the annotation schema: one test per rejection rule (checking the Event reason), the
//! low-order list against curve25519-dalek, and property tests for round trips and bounds.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use proptest::prelude::*;

use super::{point::*, *};
use crate::keys::PrivateKey;

fn key(seed: u8) -> PublicKey {
    PrivateKey::from_bytes([seed; 32]).public_key()
}

fn node_ip() -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(192, 168, 1, 10))
}

fn valid() -> BTreeMap<String, String> {
    BTreeMap::from([
        (ANNOTATION_PUBLIC_KEY.to_string(), key(1).to_base64()),
        (
            ANNOTATION_ENDPOINT.to_string(),
            format!("192.168.1.10:{DEFAULT_LISTEN_PORT}"),
        ),
        (ANNOTATION_KEY_GENERATION.to_string(), "3".to_string()),
    ])
}

fn with(annotation: &str, value: &str) -> BTreeMap<String, String> {
    let mut map = valid();
    map.insert(annotation.to_string(), value.to_string());
    map
}

fn parse_err(map: &BTreeMap<String, String>) -> AnnotationError {
    NodeAnnotations::parse(map, &[node_ip()]).expect_err("must be rejected")
}

/// A key annotation value from raw bytes.
fn b64(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

const P_MINUS_1: [u8; 32] = SMALL_ORDER[4];

fn p_plus(k: u8) -> [u8; 32] {
    let mut u = P_MINUS_1;
    u[0] = 0xed + k;
    u
}

fn top_bit(mut u: [u8; 32]) -> [u8; 32] {
    u[31] |= 0x80;
    u
}

#[test]
fn valid_annotations_parse() {
    let parsed = NodeAnnotations::parse(&valid(), &[node_ip()]).unwrap();
    assert_eq!(parsed.public_key, key(1));
    assert_eq!(
        parsed.endpoint,
        SocketAddr::new(node_ip(), DEFAULT_LISTEN_PORT)
    );
    assert_eq!(parsed.key_generation, 3);
    assert_eq!(parsed.next_public_key, None);
    assert_eq!(parsed.rotation, None);
    assert_eq!(parsed.render(), valid());
}

#[test]
fn full_annotations_with_ipv6_parse_and_render() {
    let v6: IpAddr = "fd00::10".parse().unwrap();
    let mut map = valid();
    map.insert(ANNOTATION_ENDPOINT.into(), "[fd00::10]:51871".into());
    map.insert(ANNOTATION_NEXT_PUBLIC_KEY.into(), key(2).to_base64());
    map.insert(ANNOTATION_ROTATION.into(), "weekly-2026.11=prepared".into());
    let parsed = NodeAnnotations::parse(&map, &[node_ip(), v6]).unwrap();
    assert_eq!(parsed.endpoint, SocketAddr::new(v6, 51871));
    assert_eq!(parsed.next_public_key, Some(key(2)));
    assert_eq!(
        parsed.rotation,
        Some(RotationMark::new("weekly-2026.11", RotationStep::Prepared))
    );
    assert_eq!(
        parsed.rotation_step("weekly-2026.11"),
        Some(RotationStep::Prepared)
    );
    assert_eq!(parsed.rotation_step("other"), None);
    assert_eq!(parsed.render(), map);
}

#[test]
fn unknown_annotations_are_ignored() {
    let mut map = valid();
    map.insert("example.com/whatever".into(), "x".into());
    map.insert("wiremesh.io/future-field".into(), "y".into());
    assert!(NodeAnnotations::parse(&map, &[node_ip()]).is_ok());
}

#[test]
fn absent_public_key_is_not_published() {
    for map in [BTreeMap::new(), {
        let mut m = valid();
        m.remove(ANNOTATION_PUBLIC_KEY);
        m
    }] {
        let e = parse_err(&map);
        assert_eq!(e, AnnotationError::NotPublished);
        assert_eq!(e.reason(), "PublicKeyNotPublished");
        assert_eq!(e.annotation(), ANNOTATION_PUBLIC_KEY);
    }
}

fn assert_key_problem(value: &str, want: KeyProblem, reason: &str) {
    for annotation in [ANNOTATION_PUBLIC_KEY, ANNOTATION_NEXT_PUBLIC_KEY] {
        let e = parse_err(&with(annotation, value));
        match &e {
            AnnotationError::InvalidKey {
                annotation: a,
                problem,
                ..
            } => {
                assert_eq!(*a, annotation, "{value}");
                assert_eq!(*problem, want, "{value}");
            }
            other => panic!("{value}: want InvalidKey, got {other:?}"),
        }
        assert_eq!(e.reason(), reason);
        assert_eq!(e.annotation(), annotation);
        assert!(e.to_string().contains(annotation), "{e}");
    }
}

#[test]
fn bad_base64_is_rejected() {
    for value in [
        "not base64 at all!",
        "@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@=",
        // url-safe alphabet
        "_-_-_-_-_-_-_-_-_-_-_-_-_-_-_-_-_-_-_-_-_-8=",
        // missing padding
        "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE",
        "====",
    ] {
        assert_key_problem(value, KeyProblem::Encoding, "InvalidKeyEncoding");
    }
}

#[test]
fn base64_with_non_zero_trailing_bits_is_rejected() {
    // 32 bytes end in 2 spare bits; a canonical encoder leaves them zero.
    let good = key(7).to_base64();
    let last = good.as_bytes()[42];
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let index = alphabet.iter().position(|c| *c == last).unwrap();
    let mut bad = good.clone().into_bytes();
    bad[42] = alphabet[index ^ 1];
    let bad = String::from_utf8(bad).unwrap();
    assert_key_problem(&bad, KeyProblem::Encoding, "InvalidKeyEncoding");
}

#[test]
fn wrong_length_is_rejected() {
    for len in [0usize, 1, 16, 31, 33, 64] {
        assert_key_problem(
            &b64(&vec![9u8; len]),
            KeyProblem::Length(len),
            "InvalidKeyLength",
        );
    }
}

#[test]
fn all_zero_key_is_rejected() {
    assert_key_problem(&b64(&[0u8; 32]), KeyProblem::AllZero, "ZeroPublicKey");
}

#[test]
fn every_small_order_point_is_rejected() {
    for u in SMALL_ORDER.iter().skip(1) {
        assert_key_problem(&b64(u), KeyProblem::LowOrder, "LowOrderPublicKey");
    }
}

#[test]
fn non_canonical_spellings_of_small_order_points_are_rejected_as_low_order() {
    let mut spellings = vec![p_plus(0), p_plus(1), top_bit([0; 32])];
    spellings.extend(SMALL_ORDER.iter().skip(1).map(|u| top_bit(*u)));
    spellings.push(top_bit(p_plus(0)));
    spellings.push(top_bit(p_plus(1)));
    for u in spellings {
        assert_key_problem(&b64(&u), KeyProblem::LowOrder, "LowOrderPublicKey");
    }
}

#[test]
fn other_non_canonical_keys_are_rejected() {
    let mut cases = vec![top_bit(*key(3).as_bytes())];
    for k in 2..=18 {
        cases.push(p_plus(k));
    }
    for u in cases {
        assert_key_problem(&b64(&u), KeyProblem::NonCanonical, "NonCanonicalPublicKey");
    }
    // The largest 255-bit value is p + 18.
    assert_eq!(p_plus(18), {
        let mut m = [0xff; 32];
        m[31] = 0x7f;
        m
    });
}

#[test]
fn small_order_list_matches_curve25519_dalek_eight_torsion() {
    use curve25519_dalek::constants::EIGHT_TORSION;
    let torsion: Vec<[u8; 32]> = EIGHT_TORSION
        .iter()
        .map(|p| p.to_montgomery().to_bytes())
        .collect();
    for u in &torsion {
        assert!(SMALL_ORDER.contains(u), "torsion u {u:02x?} missing");
    }
    // The curve's 8-torsion gives 0, 1 and the two order-8 points; p - 1 is on the twist.
    let distinct: std::collections::BTreeSet<_> = torsion.iter().collect();
    assert_eq!(distinct.len(), 4);
    assert!(!torsion.contains(&P_MINUS_1));
}

#[test]
fn small_order_points_give_all_zero_shared_secrets() {
    let scalar = [0x42u8; 32];
    let mut all = SMALL_ORDER.to_vec();
    all.extend([p_plus(0), p_plus(1)]);
    all.extend(SMALL_ORDER.iter().map(|u| top_bit(*u)));
    for u in all {
        assert_eq!(x25519_dalek::x25519(scalar, u), [0; 32], "{u:02x?}");
    }
}

#[test]
fn generated_keys_validate() {
    for seed in 0..=255u8 {
        let k = key(seed);
        assert_eq!(validate_public_key(&k), Ok(()), "seed {seed}");
        assert_eq!(parse_key(ANNOTATION_PUBLIC_KEY, &k.to_base64()), Ok(k));
    }
}

#[test]
fn missing_endpoint_is_rejected() {
    let mut map = valid();
    map.remove(ANNOTATION_ENDPOINT);
    let e = parse_err(&map);
    assert_eq!(e, AnnotationError::MissingEndpoint);
    assert_eq!(e.reason(), "MissingEndpoint");
}

#[test]
fn unparsable_endpoints_are_rejected() {
    for (value, problem) in [
        ("", EndpointProblem::Syntax),
        ("192.168.1.10", EndpointProblem::Syntax),
        ("node-a.example:51871", EndpointProblem::Syntax),
        ("192.168.1.10:", EndpointProblem::Syntax),
        ("192.168.1.10:65536", EndpointProblem::Syntax),
        ("192.168.1.10:-1", EndpointProblem::Syntax),
        (" 192.168.1.10:51871", EndpointProblem::Syntax),
        ("192.168.1.10:51871 ", EndpointProblem::Syntax),
        ("fd00::10:51871", EndpointProblem::Syntax),
        ("[fe80::1%eth0]:51871", EndpointProblem::Syntax),
        ("192.168.1.10:0", EndpointProblem::PortZero),
        ("[fd00::10]:0", EndpointProblem::PortZero),
        ("[fe80::1%2]:51871", EndpointProblem::ZoneId),
    ] {
        let e = parse_err(&with(ANNOTATION_ENDPOINT, value));
        assert_eq!(
            e,
            AnnotationError::InvalidEndpoint {
                value: ShownValue::new(value),
                problem
            },
            "{value:?}"
        );
        assert_eq!(e.reason(), "InvalidEndpoint");
        assert_eq!(e.annotation(), ANNOTATION_ENDPOINT);
    }
}

#[test]
fn endpoint_outside_node_addresses_is_rejected() {
    let cases: [(&str, Vec<IpAddr>); 4] = [
        ("10.0.0.1:51871", vec![node_ip()]),
        ("192.168.1.10:51871", vec![]),
        (
            "[::ffff:192.168.1.10]:51871",
            vec![node_ip(), IpAddr::V6(Ipv6Addr::LOCALHOST)],
        ),
        ("[fd00::11]:51871", vec!["fd00::10".parse().unwrap()]),
    ];
    for (value, addresses) in cases {
        let e =
            NodeAnnotations::parse(&with(ANNOTATION_ENDPOINT, value), &addresses).expect_err(value);
        assert!(
            matches!(e, AnnotationError::EndpointNotNodeAddress { endpoint } if endpoint.to_string() == value),
            "{value}: {e:?}"
        );
        assert_eq!(e.reason(), "EndpointNotNodeAddress");
        assert!(e.to_string().contains("not one of the node's addresses"));
    }
}

#[test]
fn stale_endpoint_maps_to_the_node_address_of_its_family_for_peering() {
    // The node moved from 192.168.1.10 to 192.168.1.20 (its Node's InternalIP says so); its
    // agent has not republished the endpoint yet.
    let moved_to = IpAddr::V4(Ipv4Addr::new(192, 168, 1, 20));
    let v6: IpAddr = "fd00::20".parse().unwrap();
    let mut map = valid();
    map.insert(ANNOTATION_NEXT_PUBLIC_KEY.into(), key(2).to_base64());
    map.insert(ANNOTATION_NEXT_ENDPOINT.into(), "192.168.1.10:51872".into());
    // InternalIPs first in the views' order; an IPv6 address first must not be picked.
    let addresses = [v6, moved_to, IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7))];
    let strict = NodeAnnotations::parse(&map, &addresses).expect_err("stale endpoint");
    assert_eq!(strict.reason(), "EndpointNotNodeAddress");

    let (parsed, moved) = NodeAnnotations::parse_for_peering(&map, &addresses).unwrap();
    assert_eq!(
        parsed.endpoint,
        SocketAddr::new(moved_to, DEFAULT_LISTEN_PORT)
    );
    assert_eq!(parsed.next_endpoint, Some(SocketAddr::new(moved_to, 51872)));
    assert_eq!(parsed.public_key, key(1));
    assert_eq!(parsed.next_public_key, Some(key(2)));
    assert_eq!(
        moved,
        [
            MovedEndpoint {
                annotation: ANNOTATION_ENDPOINT,
                annotated: "192.168.1.10:51871".parse().unwrap(),
                used: SocketAddr::new(moved_to, DEFAULT_LISTEN_PORT),
            },
            MovedEndpoint {
                annotation: ANNOTATION_NEXT_ENDPOINT,
                annotated: "192.168.1.10:51872".parse().unwrap(),
                used: SocketAddr::new(moved_to, 51872),
            },
        ]
    );
    let message = moved[0].to_string();
    assert!(
        message.contains("192.168.1.10") && message.contains("192.168.1.20:51871"),
        "{message}"
    );

    // Up to date: nothing moved, the same result as the strict parse.
    let current = with(ANNOTATION_ENDPOINT, "192.168.1.20:51871");
    let (parsed, moved) = NodeAnnotations::parse_for_peering(&current, &addresses).unwrap();
    assert!(moved.is_empty());
    assert_eq!(Ok(parsed), NodeAnnotations::parse(&current, &addresses));
}

#[test]
fn stale_endpoint_without_an_address_of_its_family_is_still_rejected() {
    let cases: [(&str, Vec<IpAddr>); 3] = [
        ("[fd00::11]:51871", vec![node_ip()]),
        ("10.0.0.1:51871", vec!["fd00::10".parse().unwrap()]),
        ("192.168.1.10:51871", vec![]),
    ];
    for (value, addresses) in cases {
        let e = NodeAnnotations::parse_for_peering(&with(ANNOTATION_ENDPOINT, value), &addresses)
            .expect_err(value);
        assert!(
            matches!(e, AnnotationError::EndpointNotNodeAddress { endpoint } if endpoint.to_string() == value),
            "{value}: {e:?}"
        );
    }
    // Anything malformed is rejected as by the strict parse, whatever the addresses.
    for (annotation, value) in [
        (ANNOTATION_ENDPOINT, "example.com:51871"),
        (ANNOTATION_ENDPOINT, "10.0.0.1:0"),
        (ANNOTATION_PUBLIC_KEY, "garbage"),
        (ANNOTATION_KEY_GENERATION, "-1"),
    ] {
        let map = with(annotation, value);
        assert_eq!(
            NodeAnnotations::parse_for_peering(&map, &[node_ip()]).map(|(p, _)| p),
            NodeAnnotations::parse(&map, &[node_ip()]),
            "{annotation}={value}"
        );
        assert!(NodeAnnotations::parse(&map, &[node_ip()]).is_err());
    }
}

#[test]
fn missing_generation_is_rejected() {
    let mut map = valid();
    map.remove(ANNOTATION_KEY_GENERATION);
    let e = parse_err(&map);
    assert_eq!(e, AnnotationError::MissingKeyGeneration);
    assert_eq!(e.reason(), "MissingKeyGeneration");
}

#[test]
fn bad_generations_are_rejected() {
    for (value, problem) in [
        ("", GenerationProblem::NotDecimal),
        ("-1", GenerationProblem::NotDecimal),
        ("+1", GenerationProblem::NotDecimal),
        (" 1", GenerationProblem::NotDecimal),
        ("1 ", GenerationProblem::NotDecimal),
        ("1.0", GenerationProblem::NotDecimal),
        ("0x10", GenerationProblem::NotDecimal),
        ("one", GenerationProblem::NotDecimal),
        ("١٢", GenerationProblem::NotDecimal),
        ("01", GenerationProblem::LeadingZero),
        ("00", GenerationProblem::LeadingZero),
        ("18446744073709551616", GenerationProblem::Overflow),
        ("99999999999999999999999999", GenerationProblem::Overflow),
    ] {
        let e = parse_err(&with(ANNOTATION_KEY_GENERATION, value));
        assert_eq!(
            e,
            AnnotationError::InvalidKeyGeneration {
                value: ShownValue::new(value),
                problem
            },
            "{value:?}"
        );
        assert_eq!(e.reason(), "InvalidKeyGeneration");
    }
    assert_eq!(parse_key_generation("0"), Ok(0));
    assert_eq!(parse_key_generation("18446744073709551615"), Ok(u64::MAX));
}

#[test]
fn bad_rotation_marks_are_rejected() {
    let long = format!("{}=prepared", "a".repeat(254));
    for (value, problem) in [
        ("", MarkProblem::Syntax),
        ("prepared", MarkProblem::Syntax),
        ("=prepared", MarkProblem::Name),
        ("Weekly=prepared", MarkProblem::Name),
        ("-weekly=prepared", MarkProblem::Name),
        ("weekly-=prepared", MarkProblem::Name),
        ("a..b=prepared", MarkProblem::Name),
        (".a=prepared", MarkProblem::Name),
        ("a_b=prepared", MarkProblem::Name),
        ("a b=prepared", MarkProblem::Name),
        (long.as_str(), MarkProblem::Name),
        ("weekly=", MarkProblem::Step),
        ("weekly=done", MarkProblem::Step),
        ("weekly=Prepared", MarkProblem::Step),
        ("weekly=prepared=1", MarkProblem::Step),
        ("weekly=prepared ", MarkProblem::Step),
    ] {
        let e = parse_err(&with(ANNOTATION_ROTATION, value));
        assert_eq!(
            e,
            AnnotationError::InvalidRotationMark {
                value: ShownValue::new(value),
                problem
            },
            "{value:?}"
        );
        assert_eq!(e.reason(), "InvalidRotationMark");
        assert_eq!(RotationMark::parse(value), Err(e));
    }
    let longest = [
        "a".repeat(63),
        "b".repeat(63),
        "c".repeat(63),
        "d".repeat(61),
    ]
    .join(".");
    assert_eq!(longest.len(), 253);
    assert!(RotationMark::parse(&format!("{longest}=retired")).is_ok());
    assert!(RotationMark::parse(&format!("{longest}e=retired")).is_err());
}

#[test]
fn every_step_round_trips() {
    for step in [
        RotationStep::Prepared,
        RotationStep::Switched,
        RotationStep::Retired,
        RotationStep::Aborted,
    ] {
        let mark = RotationMark::new("r-1", step);
        assert_eq!(mark.to_string(), format!("r-1={}", step.as_str()));
        assert_eq!(mark.to_string().parse::<RotationMark>(), Ok(mark));
    }
}

#[test]
fn steps_are_ordered_and_aborted_reaches_nothing() {
    use RotationStep::*;
    assert!(Retired.reached(Prepared) && Retired.reached(Switched) && Retired.reached(Retired));
    assert!(Switched.reached(Prepared) && !Switched.reached(Retired));
    assert!(!Prepared.reached(Switched));
    for s in [Prepared, Switched, Retired, Aborted] {
        assert!(!Aborted.reached(s));
        assert!(!s.reached(Aborted));
    }
}

#[test]
fn first_problem_wins_in_a_fixed_order() {
    // key before endpoint before generation before next key before mark
    let mut map = BTreeMap::new();
    map.insert(ANNOTATION_PUBLIC_KEY.into(), "bad".into());
    map.insert(ANNOTATION_ENDPOINT.into(), "bad".into());
    map.insert(ANNOTATION_KEY_GENERATION.into(), "bad".into());
    map.insert(ANNOTATION_NEXT_PUBLIC_KEY.into(), "bad".into());
    map.insert(ANNOTATION_ROTATION.into(), "bad".into());
    let order = [
        (
            ANNOTATION_PUBLIC_KEY,
            key(1).to_base64(),
            "InvalidKeyEncoding",
        ),
        (
            ANNOTATION_ENDPOINT,
            "192.168.1.10:1".into(),
            "InvalidEndpoint",
        ),
        (
            ANNOTATION_KEY_GENERATION,
            "1".into(),
            "InvalidKeyGeneration",
        ),
        (
            ANNOTATION_NEXT_PUBLIC_KEY,
            key(2).to_base64(),
            "InvalidKeyEncoding",
        ),
        (
            ANNOTATION_ROTATION,
            "r=prepared".into(),
            "InvalidRotationMark",
        ),
    ];
    for (annotation, fixed, reason) in order {
        let e = parse_err(&map);
        assert_eq!(e.reason(), reason);
        assert_eq!(e.annotation(), annotation);
        map.insert(annotation.into(), fixed);
    }
    assert!(NodeAnnotations::parse(&map, &[node_ip()]).is_ok());
}

#[test]
fn hostile_values_give_short_escaped_messages() {
    let huge = "A".repeat(256 * 1024);
    let control = "\u{1b}[31mred\u{7}\n\r\0".repeat(100);
    let wide = "\u{10ffff}".repeat(1000);
    for value in [huge.as_str(), control.as_str(), wide.as_str()] {
        for annotation in [
            ANNOTATION_PUBLIC_KEY,
            ANNOTATION_ENDPOINT,
            ANNOTATION_KEY_GENERATION,
            ANNOTATION_NEXT_PUBLIC_KEY,
            ANNOTATION_ROTATION,
        ] {
            let e = parse_err(&with(annotation, value));
            let message = e.to_string();
            assert!(message.len() <= 200, "{} bytes: {message}", message.len());
            assert!(
                !message.contains('\u{1b}') && !message.contains('\n'),
                "{message}"
            );
            assert!(message.contains(annotation));
        }
    }
    assert!(
        ShownValue::new(&huge)
            .as_str()
            .ends_with("...(262144 bytes)")
    );
    assert_eq!(ShownValue::new("short").as_str(), "short");
}

#[test]
fn reasons_are_distinct_camel_case() {
    let errors = [
        AnnotationError::NotPublished,
        parse_err(&with(ANNOTATION_PUBLIC_KEY, "x")),
        parse_err(&with(ANNOTATION_PUBLIC_KEY, &b64(&[1; 31]))),
        parse_err(&with(ANNOTATION_PUBLIC_KEY, &b64(&[0; 32]))),
        parse_err(&with(ANNOTATION_PUBLIC_KEY, &b64(&SMALL_ORDER[2]))),
        parse_err(&with(ANNOTATION_PUBLIC_KEY, &b64(&p_plus(5)))),
        AnnotationError::MissingEndpoint,
        parse_err(&with(ANNOTATION_ENDPOINT, "x")),
        parse_err(&with(ANNOTATION_ENDPOINT, "10.9.9.9:1")),
        AnnotationError::MissingKeyGeneration,
        parse_err(&with(ANNOTATION_KEY_GENERATION, "x")),
        parse_err(&with(ANNOTATION_ROTATION, "x")),
    ];
    let reasons: std::collections::BTreeSet<_> = errors.iter().map(|e| e.reason()).collect();
    assert_eq!(reasons.len(), errors.len(), "{reasons:?}");
    for r in reasons {
        assert!(r.chars().next().unwrap().is_ascii_uppercase());
        assert!(r.chars().all(|c| c.is_ascii_alphanumeric()), "{r}");
    }
}

#[test]
fn claimed_keys_lists_next_once() {
    let mut parsed = NodeAnnotations::parse(&valid(), &[node_ip()]).unwrap();
    assert_eq!(parsed.claimed_keys().collect::<Vec<_>>(), [key(1)]);
    parsed.next_public_key = Some(key(2));
    assert_eq!(parsed.claimed_keys().collect::<Vec<_>>(), [key(1), key(2)]);
    parsed.next_public_key = Some(key(1));
    assert_eq!(parsed.claimed_keys().collect::<Vec<_>>(), [key(1)]);
}

// ---- properties ----

fn arb_key() -> impl Strategy<Value = PublicKey> {
    any::<[u8; 32]>().prop_map(|b| PrivateKey::from_bytes(b).public_key())
}

fn arb_ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(IpAddr::from),
        any::<[u8; 16]>().prop_map(IpAddr::from),
    ]
}

fn arb_name() -> impl Strategy<Value = String> {
    proptest::string::string_regex("[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\\.[a-z0-9]{1,10}){0,3}")
        .unwrap()
}

fn arb_step() -> impl Strategy<Value = RotationStep> {
    prop_oneof![
        Just(RotationStep::Prepared),
        Just(RotationStep::Switched),
        Just(RotationStep::Retired),
        Just(RotationStep::Aborted),
    ]
}

prop_compose! {
    fn arb_node()(
        public_key in arb_key(),
        ip in arb_ip(),
        extra in proptest::collection::vec(arb_ip(), 0..3),
        port in 1u16..,
        key_generation in any::<u64>(),
        next_public_key in proptest::option::of(arb_key()),
        rotation in proptest::option::of((arb_name(), arb_step())),
    ) -> (NodeAnnotations, Vec<IpAddr>) {
        let mut addresses = extra;
        addresses.push(ip);
        (
            NodeAnnotations {
                public_key,
                endpoint: SocketAddr::new(ip, port),
                key_generation,
                next_public_key,
                next_endpoint: None,
                rotation: rotation.map(|(n, s)| RotationMark::new(n, s)),
            },
            addresses,
        )
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn render_then_parse_is_identity((node, addresses) in arb_node()) {
        prop_assert_eq!(NodeAnnotations::parse(&node.render(), &addresses), Ok(node));
    }

    #[test]
    fn parse_then_render_is_canonical((node, addresses) in arb_node(), junk in ".{0,40}") {
        // Adding foreign annotations changes nothing; rendering a parse gives the same map back.
        let mut map = node.render();
        map.insert("example.com/junk".into(), junk);
        let parsed = NodeAnnotations::parse(&map, &addresses).unwrap();
        map.remove("example.com/junk");
        prop_assert_eq!(parsed.render(), map);
    }

    #[test]
    fn validate_agrees_with_x25519(bytes in any::<[u8; 32]>()) {
        // Reference: canonical, and the X25519 function with a clamped (cofactor-clearing) scalar
        // does not map the point to zero.
        let canonical = reduce(&bytes) == bytes;
        let contributes = x25519_dalek::x25519([0x5a; 32], bytes) != [0; 32];
        let result = validate_public_key(&PublicKey::from_bytes(bytes));
        prop_assert_eq!(result.is_ok(), canonical && contributes);
        if !contributes {
            prop_assert!(matches!(result, Err(KeyProblem::AllZero | KeyProblem::LowOrder)));
        }
    }

    #[test]
    fn any_value_in_any_annotation_never_panics_and_stays_short(
        annotation in proptest::sample::select(ALL_ANNOTATIONS.to_vec()),
        value in ".{0,300}",
    ) {
        if let Err(e) = NodeAnnotations::parse(&with(annotation, &value), &[node_ip()]) {
            prop_assert!(e.to_string().len() <= 200);
            prop_assert!(!e.reason().is_empty());
        }
    }

    #[test]
    fn key_bytes_of_wrong_length_are_length_errors(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
        prop_assume!(bytes.len() != 32);
        let e = parse_err(&with(ANNOTATION_PUBLIC_KEY, &b64(&bytes)));
        prop_assert_eq!(e.reason(), "InvalidKeyLength");
    }

    #[test]
    fn generation_round_trips(n in any::<u64>()) {
        prop_assert_eq!(parse_key_generation(&n.to_string()), Ok(n));
        let padded = format!("0{n}");
        prop_assert!(parse_key_generation(&padded).is_err());
    }

    #[test]
    fn marks_round_trip(name in arb_name(), step in arb_step()) {
        let mark = RotationMark::new(name, step);
        prop_assert_eq!(RotationMark::parse(&mark.to_string()), Ok(mark));
    }

    #[test]
    fn marks_from_arbitrary_text_round_trip_or_fail_cleanly(text in ".{0,80}") {
        match RotationMark::parse(&text) {
            Ok(mark) => prop_assert_eq!(mark.to_string(), text),
            Err(e) => prop_assert_eq!(e.reason(), "InvalidRotationMark"),
        }
    }

    #[test]
    fn endpoint_not_in_addresses_is_rejected(ip in arb_ip(), other in arb_ip(), port in 1u16..) {
        prop_assume!(ip != other);
        let endpoint = SocketAddr::new(ip, port).to_string();
        prop_assert_eq!(
            parse_endpoint(&endpoint, &[other]),
            Err(AnnotationError::EndpointNotNodeAddress { endpoint: SocketAddr::new(ip, port) })
        );
        prop_assert_eq!(parse_endpoint(&endpoint, &[other, ip]), Ok(SocketAddr::new(ip, port)));
    }

    #[test]
    fn peering_endpoints_never_point_outside_the_node_addresses(
        ip in arb_ip(),
        port in 1u16..,
        addresses in proptest::collection::vec(arb_ip(), 0..4),
        next in proptest::option::of((arb_ip(), 1u16..)),
    ) {
        let mut map = with(ANNOTATION_ENDPOINT, &SocketAddr::new(ip, port).to_string());
        if let Some((next_ip, next_port)) = next {
            map.insert(
                ANNOTATION_NEXT_ENDPOINT.into(),
                SocketAddr::new(next_ip, next_port).to_string(),
            );
        }
        let same_family = |ip: IpAddr| addresses.iter().find(|a| a.is_ipv4() == ip.is_ipv4()).copied();
        // Where each endpoint must go: as annotated when the node has that address, else its
        // first address of the family (port kept), else nowhere (rejected).
        let expect = |ip: IpAddr, port: u16| {
            if addresses.contains(&ip) {
                Some(SocketAddr::new(ip, port))
            } else {
                same_family(ip).map(|a| SocketAddr::new(a, port))
            }
        };
        let want_endpoint = expect(ip, port);
        let want_next = next.map(|(i, p)| expect(i, p));
        match NodeAnnotations::parse_for_peering(&map, &addresses) {
            Ok((parsed, moved)) => {
                prop_assert!(addresses.contains(&parsed.endpoint.ip()));
                prop_assert_eq!(Some(parsed.endpoint), want_endpoint);
                prop_assert_eq!(parsed.endpoint.port(), port);
                if let Some(next) = parsed.next_endpoint {
                    prop_assert!(addresses.contains(&next.ip()));
                }
                prop_assert_eq!(parsed.next_endpoint.map(Some), want_next);
                for m in &moved {
                    prop_assert!(addresses.contains(&m.used.ip()));
                    prop_assert!(!addresses.contains(&m.annotated.ip()));
                    prop_assert_eq!(m.used.port(), m.annotated.port());
                }
                let expected_moves = usize::from(!addresses.contains(&ip))
                    + usize::from(next.is_some_and(|(i, _)| !addresses.contains(&i)));
                prop_assert_eq!(moved.len(), expected_moves);
            }
            Err(e) => {
                prop_assert!(
                    want_endpoint.is_none() || want_next.is_some_and(|n| n.is_none()),
                    "rejected though every endpoint has an address: {:?}", e
                );
                prop_assert_eq!(e.reason(), "EndpointNotNodeAddress");
            }
        }
    }

    #[test]
    fn shown_values_are_bounded(value in any::<String>()) {
        let shown = ShownValue::new(&value);
        prop_assert!(shown.as_str().len() <= SHOWN_LEN + 10 + 30);
        prop_assert!(!shown.as_str().chars().any(char::is_control));
    }
}
