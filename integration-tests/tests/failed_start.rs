//! A cluster whose start fails half-way (testenv exits at once) leaves nothing behind. Its own test
//! binary, so every name with this process's id prefix belongs to this test.

use wiremesh_integration::{
    ClusterError, ClusterId, ClusterOptions, TestenvError, VirtualCluster, command,
};

#[tokio::test]
async fn failed_start_releases_what_it_created() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert!(
            std::env::var_os("CI").is_none(),
            "privileged test run without root under CI"
        );
        eprintln!("SKIPPED: needs root (bridge)");
        return;
    }
    // Ids are <5 chars of PID><2 chars of counter>: everything this process creates shares the prefix.
    let prefix = ClusterId::next().as_str()[..5].to_owned();
    let opts = ClusterOptions {
        testenv_binary: "/bin/false".into(),
        ..ClusterOptions::default()
    };
    let err = VirtualCluster::start(opts)
        .await
        .expect_err("testenv exits at once");
    assert!(
        matches!(err, ClusterError::Testenv(TestenvError::ExitedEarly { .. })),
        "{err}"
    );

    let links = command::ip(["-o", "link", "show"]).expect("ip link");
    assert!(
        !links.contains(&format!("wmb{prefix}")),
        "bridge left behind: {links}"
    );
    let netns = command::ip(["netns", "list"]).expect("ip netns list");
    assert!(
        !netns.contains(&format!("wm{prefix}")),
        "namespace left behind: {netns}"
    );
    let leftover_dirs: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .expect("read tmp")
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("wiremesh-{prefix}"))
        })
        .collect();
    assert!(
        leftover_dirs.is_empty(),
        "work dir left behind: {leftover_dirs:?}"
    );
}
