//! The control-plane scale benchmark (issue 17; `make bench-scale`, see docs/benchmarks.md):
//! `scale_bench --nodes N [--agents A] [--pods-per-node P] [--new-nodes K] [--steady-secs S]
//! [--sim-watches nodes,pods,...]`. Needs root (the real agent's node is a network namespace with
//! a TUN device) and the debug binaries (`cargo build -p mesh-agent -p meshctl -p
//! wiremesh-integration --bins`). What it measures: `tests/scale_support/scale.rs`.

#[path = "../tests/scale_support/scale.rs"]
mod scale;
#[path = "../tests/mesh_support/support.rs"]
mod support;

use std::time::Duration;

fn main() {
    let mut args = std::env::args().skip(1);
    let mut opts = scale::Options {
        nodes: 100,
        agents: 0,
        pods_per_node: 10,
        new_nodes: 5,
        steady: Duration::from_secs(60),
        sim_watches: None,
        concurrency: 16,
    };
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        let number =
            |v: String| -> usize { v.parse().unwrap_or_else(|_| panic!("{v}: not a number")) };
        match arg.as_str() {
            "--nodes" => opts.nodes = number(value()),
            "--agents" => opts.agents = number(value()),
            "--pods-per-node" => opts.pods_per_node = number(value()),
            "--new-nodes" => opts.new_nodes = number(value()),
            "--steady-secs" => opts.steady = Duration::from_secs(number(value()) as u64),
            "--concurrency" => opts.concurrency = number(value()),
            "--sim-watches" => {
                opts.sim_watches = Some(value().split(',').map(str::to_string).collect());
            }
            other => panic!("unknown argument {other}"),
        }
    }
    if opts.agents == 0 {
        opts.agents = opts.nodes;
    }
    if !wiremesh_integration::have_root("network namespaces, TUN devices") {
        eprintln!("scale_bench: needs root");
        std::process::exit(2);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    println!("scale_bench {opts:?}");
    let report = runtime.block_on(scale::run(&opts));
    report.print();
}
