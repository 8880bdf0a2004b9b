use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use projector::ProjectorConfig;
use service_kit::config::ServiceConfig;
use service_kit::runtime::{self, Threads};

/// The projector: merges the change topic into MongoDB for the cloud bridges.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// The projector's configuration file (TOML).
    #[arg(long, env = "PROJECTOR_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Project the change topic until stopped (run one or more; they share the topic's partitions).
    Serve,
    /// Check the configuration file (with environment overrides) and exit.
    CheckConfig,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let path = cli.config.context("--config (or PROJECTOR_CONFIG) is required")?;
    let config = ProjectorConfig::load(&path)?;
    match cli.command {
        Command::Serve => {
            let listen = config.projector.listen;
            runtime::serve(config, listen, Threads::default(), projector::run).context("projector failed")
        }
        Command::CheckConfig => {
            println!("configuration is valid: {}", config.summary());
            Ok(())
        }
    }
}
