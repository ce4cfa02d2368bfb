//! `Maps::retain_policy` (root, private bpffs): after a restart the agent writes the current
//! compilation over the pinned maps and deletes whatever an older compilation left behind.

#[path = "common/fixtures.rs"]
mod fixtures;

use fixtures::{Bpffs, net_policy, pods_v4, root_or_skip};
use wiremesh_bpf::Loader;
use wiremesh_integration::vm;
use wiremesh_policy::{Compiled, compile, load_manifest};

/// The other test of this binary again on Debian's kernel 6.1 in the kernel VM (map iteration
/// and deletion of LPM tries on an older kernel).
#[test]
fn retain_tests_on_kernel_6_1() {
    vm::rerun_all_in_vm(&["retain_tests_on_kernel_6_1"]);
}

/// b isolated both ways; ingress from two ipBlocks (one with an exception, one IPv6).
fn old() -> String {
    let rules = r#"  ingress:
  - from: [{ipBlock: {cidr: 192.0.2.0/24, except: [192.0.2.128/25]}}]
    ports: [{port: 8080}]
  - from: [{ipBlock: {cidr: "2001:db8::/64"}}]
"#;
    net_policy("old", "b", "Ingress, Egress", rules)
}

/// a's ingress from b on port 80.
fn new() -> String {
    let rules = r#"  ingress:
  - from: [{podSelector: {matchLabels: {app: b}}}]
    ports: [{port: 80}]
"#;
    net_policy("new", "a", "", rules)
}

fn compiled(policies: &str) -> Compiled {
    compile(&load_manifest(&format!("{}{policies}", pods_v4())).expect("manifest"))
}

#[test]
fn retain_policy_deletes_exactly_what_the_current_compilation_lacks() {
    if !root_or_skip("retain") {
        return;
    }
    let bpffs = Bpffs::new(&format!("retain-{}", std::process::id()));
    let pins = wiremesh_bpf::node_pin_dir(&bpffs.dir, "node-r");
    let old = compiled(&old());
    let new = compiled(&new());
    {
        let mut l = Loader::load(&pins).expect("load");
        l.maps()
            .apply_policy_dual(
                &old.diff(&Compiled::default()),
                |_, _| wiremesh_bpf::IpcacheValue::default(),
                |_, _| wiremesh_bpf::IpcacheValue::default(),
            )
            .expect("old policy");
    }
    // A "restarted agent": same pins, writes the new compilation, then retains it.
    let mut l = Loader::load(&pins).expect("reload");
    let before = l.maps_ref().policy_counts();
    assert!(
        before.0 > 0 && before.1 > 0,
        "old entries pinned: {before:?}"
    );
    l.maps()
        .apply_policy(&new.diff(&Compiled::default()), |_, _| {
            wiremesh_bpf::IpcacheValue::default()
        })
        .expect("new policy");
    let epoch = l.maps_ref().policy_epoch().expect("epoch");
    let gone = l.maps().retain_policy(&new).expect("retain");
    // Flows decided under the deleted entries must re-run their lookups: a new epoch.
    assert_ne!(
        l.maps_ref().policy_epoch().expect("epoch"),
        epoch,
        "deleting policy entries starts a new policy epoch"
    );
    assert_eq!(
        l.maps_ref().policy_counts(),
        (new.isolated.len(), new.rules.len()),
        "exactly the new compilation remains"
    );
    let old_only_rules = old.rules.difference(&new.rules).count();
    let old_only_isolated = old.isolated.difference(&new.isolated).count();
    assert_eq!(gone.rules, old_only_rules);
    assert_eq!(gone.isolated, old_only_isolated);
    assert!(
        gone.cidrs > 0,
        "the old ipBlock prefixes are deleted: {gone:?}"
    );
    assert_eq!(gone.cidrs6, 1, "the old IPv6 ipBlock is deleted: {gone:?}");
    // Idempotent, and nothing deleted means no new epoch.
    let epoch = l.maps_ref().policy_epoch().expect("epoch");
    assert_eq!(l.maps().retain_policy(&new).expect("again").total(), 0);
    assert_eq!(l.maps_ref().policy_epoch().expect("epoch"), epoch);
}
