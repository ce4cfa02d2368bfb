//! `hack/build-image.sh` (what `make image` runs) builds the mesh-agent OCI image from Containerfile
//! with no registry and no Docker engine; its config says what the DaemonSet relies on (entrypoint,
//! non-root default user, OCI labels), it holds exactly the binary, the libraries ldd lists and
//! /etc/passwd|group, and the binary runs from that root filesystem alone. Root: buildah's storage.
//! Built here from the debug agent binary (the one the scenario tests use); `make image` uses the
//! release build.

#[path = "mesh_support/support.rs"]
mod mesh;

use std::{path::Path, process::Command};

use serde_json::Value;
use wiremesh_integration::{clients, have_root};

fn blob(layout: &Path, digest: &str) -> Vec<u8> {
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    std::fs::read(layout.join("blobs/sha256").join(hex)).expect("blob")
}

fn json_blob(layout: &Path, digest: &str) -> Value {
    serde_json::from_slice(&blob(layout, digest)).expect("JSON blob")
}

#[test]
fn image_builds_from_scratch_with_only_what_the_agent_needs() {
    if !have_root("buildah storage, chroot") {
        return;
    }
    let out = std::env::temp_dir().join(format!("wm-image-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let built = clients::run(
        Command::new(clients::repo_root().join("hack/build-image.sh"))
            .arg(mesh::agent_binary())
            .arg(&out)
            .arg("9.9.9-test"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{built}");
    assert!(out.join("mesh-agent-9.9.9-test.oci.tar").is_file());

    let layout = out.join("oci");
    let index: Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).expect("index.json"))
            .expect("index JSON");
    let entry = &index["manifests"][0];
    assert_eq!(
        entry["annotations"]["org.opencontainers.image.ref.name"],
        "9.9.9-test"
    );
    let manifest = json_blob(&layout, entry["digest"].as_str().expect("digest"));
    let config = json_blob(
        &layout,
        manifest["config"]["digest"]
            .as_str()
            .expect("config digest"),
    );
    assert_eq!(config["architecture"], "amd64");
    assert_eq!(config["os"], "linux");
    let c = &config["config"];
    assert_eq!(
        c["Entrypoint"],
        serde_json::json!(["/usr/local/bin/mesh-agent"])
    );
    assert_eq!(c["Cmd"], serde_json::json!(["--help"]));
    assert_eq!(c["User"], "65534:65534", "non-root by default");
    let labels = c["Labels"].as_object().expect("labels");
    for (key, want) in [
        (
            "org.opencontainers.image.title",
            Some("wiremesh mesh-agent"),
        ),
        ("org.opencontainers.image.version", Some("9.9.9-test")),
        ("org.opencontainers.image.licenses", Some("Apache-2.0")),
        ("org.opencontainers.image.source", None),
        ("org.opencontainers.image.revision", None),
        ("org.opencontainers.image.created", None),
        ("org.opencontainers.image.description", None),
    ] {
        let got = labels
            .get(key)
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("label {key} missing: {labels:?}"));
        assert!(!got.is_empty(), "{key} empty");
        if let Some(want) = want {
            assert_eq!(got, want, "{key}");
        }
    }

    // One layer (FROM scratch + one COPY), small.
    let layers = manifest["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 1, "{layers:?}");
    let size: u64 = layers
        .iter()
        .map(|l| l["size"].as_u64().expect("size"))
        .sum();
    eprintln!("image layer: {} bytes compressed", size);
    assert!(size < 40 << 20, "image layer is {size} bytes");

    // Exactly the binary, its libraries and the user database.
    let rootfs = out.join("rootfs");
    std::fs::create_dir_all(&rootfs).expect("rootfs dir");
    let layer = layout.join("blobs/sha256").join(
        layers[0]["digest"]
            .as_str()
            .and_then(|d| d.strip_prefix("sha256:"))
            .expect("layer digest"),
    );
    let listing = clients::run(
        Command::new("tar")
            .arg("-xvzf")
            .arg(&layer)
            .arg("-C")
            .arg(&rootfs),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut files: Vec<&str> = listing
        .lines()
        .map(|l| l.trim_start_matches("./"))
        .filter(|l| !l.is_empty() && !l.ends_with('/'))
        .collect();
    files.sort_unstable();
    assert_eq!(
        files,
        [
            "etc/group",
            "etc/passwd",
            "lib/x86_64-linux-gnu/libc.so.6",
            "lib/x86_64-linux-gnu/libgcc_s.so.1",
            "lib/x86_64-linux-gnu/libm.so.6",
            "lib64/ld-linux-x86-64.so.2",
            "usr/local/bin/mesh-agent",
        ]
    );
    // It runs from that root alone, as the image's default user.
    let version = clients::run(
        Command::new("chroot")
            .arg("--userspec=65534:65534")
            .arg(&rootfs)
            .args(["/usr/local/bin/mesh-agent", "--version"]),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(version.starts_with("mesh-agent "), "{version}");

    std::fs::remove_dir_all(&out).expect("remove output");
}
