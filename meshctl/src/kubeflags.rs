//! kubectl's connection and output flags, so meshctl behaves the same when kubectl runs it as the
//! plugin `kubectl wiremesh ...` (kubectl hands every argument after the plugin name through
//! unchanged): `--kubeconfig`, `--context`, `-n/--namespace`, `-o json|yaml|wide`.

use std::{fmt::Write as _, path::PathBuf};

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use kube::config::{KubeConfigOptions, Kubeconfig};
use meshctl::status::{self, MeshStatus};

/// Which cluster to talk to, as kubectl spells it.
#[derive(Args, Clone, Debug, Default)]
pub struct KubeFlags {
    /// Kubeconfig file (default: $KUBECONFIG, then ~/.kube/config, then in-cluster).
    #[arg(long, global = true)]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (default: its current-context).
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// Namespace of namespaced lookups (the mesh objects themselves are cluster-scoped).
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,
}

impl KubeFlags {
    /// A client for the selected kubeconfig and context.
    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        let options = KubeConfigOptions {
            context: self.context.clone(),
            ..KubeConfigOptions::default()
        };
        let mut config = match (&self.kubeconfig, &self.context) {
            (Some(path), _) => {
                let kubeconfig = Kubeconfig::read_from(path)
                    .with_context(|| format!("read kubeconfig {}", path.display()))?;
                kube::Config::from_custom_kubeconfig(kubeconfig, &options)
                    .await
                    .with_context(|| format!("load kubeconfig {}", path.display()))?
            }
            // $KUBECONFIG (a list, merged as kubectl does) or ~/.kube/config.
            (None, Some(_)) => kube::Config::from_kubeconfig(&options)
                .await
                .context("load kubeconfig")?,
            (None, None) => kube::Config::infer().await.context(
                "no --kubeconfig, no $KUBECONFIG or ~/.kube/config, and not in a cluster",
            )?,
        };
        if let Some(ns) = &self.namespace {
            config.default_namespace.clone_from(ns);
        }
        kube::Client::try_from(config).context("build kube client")
    }
}

/// `-o`: the table (default), a wider table, or the whole status as JSON or YAML.
#[derive(Clone, Copy, Debug, Default, ValueEnum)]
pub enum OutputFormat {
    /// Human-readable table with each node's peers.
    #[default]
    Table,
    /// The table plus each node's problems in a column.
    Wide,
    /// Machine-readable JSON.
    Json,
    /// Machine-readable YAML.
    Yaml,
}

/// `status` in `format`.
pub fn render_status(status: &MeshStatus, format: OutputFormat) -> anyhow::Result<String> {
    Ok(match format {
        OutputFormat::Table => status::render(status),
        OutputFormat::Wide => render_wide(status),
        OutputFormat::Json => serde_json::to_string_pretty(status)? + "\n",
        OutputFormat::Yaml => serde_yaml::to_string(status)?,
    })
}

/// One line per node with every column, peers summarised, problems spelled out.
fn render_wide(status: &MeshStatus) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<14} {:<9} {:>4}  {:<10} {:>6}  {:<5}  {:<13}  PROBLEMS",
        "NODE", "KEY", "GEN", "DATAPATH", "PEERS", "READY", "STATUS"
    );
    for node in &status.nodes {
        let [name, key, generation, datapath, peers, ready, state] = status::node_cells(node);
        let problems = if node.problems.is_empty() {
            "<none>".to_string()
        } else {
            node.problems.join("; ")
        };
        let _ = writeln!(
            out,
            "{name:<14} {key:<9} {generation:>4}  {datapath:<10} {peers:>6}  {ready:<5}  {state:<13}  {problems}",
        );
    }
    for problem in &status.problems {
        let _ = writeln!(out, "mesh: {problem}");
    }
    out
}
