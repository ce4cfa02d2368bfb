//! The control-plane scale harness (`make bench-scale`, `examples/scale_bench.rs`) at a small N,
//! so `make test` proves the harness itself works: 20 synthetic Nodes with pods, 20 simulated
//! agents on the agent's own watch code, one real agent. Asserted: every simulated agent saw
//! every new node's key and the real agent's device got each new peer (none missed); the real
//! agent configured the full peer set into its device, and again into a fresh device after the
//! device process was killed; the steady-state window counted apiserver requests; the agent's
//! RSS and eBPF maps were read. Times are printed, not asserted (docs/benchmarks.md has the
//! numbers at N = 100 and 1,000).

#[path = "scale_support/scale.rs"]
mod scale;
#[path = "mesh_support/support.rs"]
mod support;

use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_harness_measures_a_small_cluster() {
    if !wiremesh_integration::have_root("network namespaces, TUN devices") {
        return;
    }
    let opts = scale::Options {
        nodes: 20,
        agents: 20,
        pods_per_node: 2,
        new_nodes: 2,
        steady: Duration::from_secs(10),
        sim_watches: None,
        concurrency: 8,
    };
    let report = scale::run(&opts).await;
    report.print();
    assert_eq!(
        report.missed, 0,
        "a simulated agent missed a new node's key"
    );
    assert_eq!(report.propagation.len(), opts.agents * opts.new_nodes);
    assert_eq!(report.real_propagation.len(), opts.new_nodes);
    assert_eq!(report.device_peers, opts.nodes);
    assert!(report.full_apply_secs > 0.0);
    assert!(
        report.requests_total_min > 0.0,
        "no apiserver request counted"
    );
    assert!(report.agent_rss_kib > 0 && report.agent_hwm_kib >= report.agent_rss_kib);
    assert!(report.agent_anon_kib > 0 && report.agent_anon_kib <= report.agent_rss_kib);
    assert!(!report.bpf_maps.is_empty(), "the agent holds no eBPF map");
}
