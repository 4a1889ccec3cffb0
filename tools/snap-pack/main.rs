//! `snap-pack`: the steps of `scripts/snap-pack` that need more than a shell
//! (run as `cargo run --example snap-pack -- ...`; an example target so it
//! may use the dev-only YAML crate and never ships in the agent):
//!
//! - `meta`: print the `meta/snap.yaml` snapcraft would write;
//! - `layout --binary B --out DIR`: lay out the snap's tree;
//! - `check FILE.snap`: unpack a packed snap and check it against the sources.

mod snap;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
struct Cli {
    /// The project's root (holding snap/snapcraft.yaml and snap/hooks/).
    #[arg(long, default_value = ".")]
    root: PathBuf,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print meta/snap.yaml as generated from snap/snapcraft.yaml.
    Meta,
    /// Lay out the snap's tree in OUT (which must not exist).
    Layout {
        #[arg(long)]
        binary: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Unpack FILE.snap with unsquashfs and check it against the sources.
    Check { snap: PathBuf },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("snap-pack: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> snap::Result<()> {
    let yaml_path = cli.root.join("snap/snapcraft.yaml");
    match cli.command {
        Cmd::Meta => {
            let yaml = std::fs::read_to_string(&yaml_path)
                .map_err(|e| format!("{}: {e}", yaml_path.display()))?;
            print!("{}", snap::generate(&yaml, snap::snap_arch()?)?);
            Ok(())
        }
        Cmd::Layout { binary, out } => {
            snap::layout(&snap::Sources::of_project(&cli.root, &binary), &out)?;
            println!("laid out {}", out.display());
            Ok(())
        }
        Cmd::Check { snap: file } => {
            let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
            let tree = tmp.path().join("root");
            let files = snap::unpack(&file, &tree)?;
            let src = snap::Sources::of_project(&cli.root, &tree.join("bin/iot-agent"));
            let checked = snap::check_tree(&src, &tree)?;
            println!("{}: {} entries; checked:", file.display(), files.len());
            for line in checked {
                println!("  {line}");
            }
            for f in &files {
                println!("  | {f}");
            }
            Ok(())
        }
    }
}
