//! crdgen: writes the wiremesh CRD manifests (`deploy/crds/*.yaml`) from the Rust types, or with
//! `--check` verifies that the committed files match them.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::Parser;
use wiremesh_crds::{ManifestError, check_dir, write_dir};

/// Where the manifests live, relative to the repository root.
const DEFAULT_OUT: &str = "deploy/crds";

/// Generate or check the wiremesh CRD manifests.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Directory of the manifests. Default: `deploy/crds` under the current directory, which must
    /// exist (run from the repository root); an explicit directory is created if missing.
    #[arg(long)]
    out: Option<PathBuf>,

    /// Do not write; exit non-zero naming every file that differs from the types.
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("crdgen: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> anyhow::Result<()> {
    let out = match &args.out {
        Some(out) => out.clone(),
        None => {
            let out = PathBuf::from(DEFAULT_OUT);
            if !out.is_dir() {
                let cwd = std::env::current_dir().context("reading the current directory")?;
                anyhow::bail!(
                    "{DEFAULT_OUT} not found under {}: run crdgen from the repository root or pass --out DIR",
                    cwd.display()
                );
            }
            out
        }
    };
    if args.check {
        return match check_dir(&out) {
            Ok(()) => {
                println!("crdgen: {} is up to date", out.display());
                Ok(())
            }
            Err(err @ ManifestError::Drift { .. }) => Err(err.into()),
            Err(err) => Err(err).with_context(|| format!("checking {}", out.display())),
        };
    }
    let written = write_dir(&out).with_context(|| format!("writing {}", out.display()))?;
    for path in written {
        println!("crdgen: wrote {}", path.display());
    }
    Ok(())
}
