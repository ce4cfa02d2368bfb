//! Compiles every `src/*.bpf.c` with clang (`-target bpf`) into `OUT_DIR/<name>.bpf.o`, which
//! `src/programs.rs` embeds. `CLANG` overrides the compiler.

use std::{env, path::PathBuf, process::Command};

use anyhow::{Context, bail};

fn main() -> anyhow::Result<()> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".to_owned());
    println!("cargo:rerun-if-env-changed=CLANG");
    println!("cargo:rerun-if-changed=include/wiremesh.h");
    let mut sources = Vec::new();
    for entry in std::fs::read_dir(manifest.join("src")).context("reading bpf/src")? {
        let path = entry?.path();
        if path.to_string_lossy().ends_with(".bpf.c") {
            sources.push(path);
        }
    }
    sources.sort();
    if sources.is_empty() {
        bail!("no src/*.bpf.c found in {}", manifest.display());
    }
    for src in sources {
        println!("cargo:rerun-if-changed={}", src.display());
        let name = src.file_name().unwrap_or_default().to_string_lossy();
        let obj = out.join(name.trim_end_matches(".c").to_owned() + ".o");
        let output = Command::new(&clang)
            .args(["-O2", "-g", "-Wall", "-Werror", "-target", "bpf"])
            .arg("-I")
            .arg(manifest.join("include"))
            // clang-14 does not find asm/types.h in the multiarch directory by itself.
            .arg("-I/usr/include/x86_64-linux-gnu")
            .arg("-c")
            .arg(&src)
            .arg("-o")
            .arg(&obj)
            .output()
            .with_context(|| {
                format!(
                    "running `{clang}` to build {}: is clang installed (apt-get install clang \
                     libbpf-dev) or CLANG set?",
                    src.display()
                )
            })?;
        if !output.status.success() {
            bail!(
                "`{clang}` failed on {} ({}):\n{}",
                src.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
    Ok(())
}
