use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use cloud_bridge::config::Config;
use service_kit::config::ServiceConfig;
use service_kit::runtime::{self, Threads};

/// The cloud bridge: sync endpoint for edge nodes, pharmacy API.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// The bridge's configuration file (TOML).
    #[arg(long, env = "CLOUD_BRIDGE_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve edge nodes and the pharmacy.
    Serve,
    /// Check the configuration file (with environment overrides) and exit.
    CheckConfig,
    /// Moved: the projector is the `projector` binary now (README, "Upgrading").
    #[command(hide = true)]
    Project,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let load = || -> anyhow::Result<Config> {
        let path = cli.config.as_deref().context("--config (or CLOUD_BRIDGE_CONFIG) is required")?;
        Ok(Config::load(path)?)
    };
    match cli.command {
        Command::Serve => {
            let config = load()?;
            let listen = config.http.listen;
            runtime::serve(config, listen, Threads::default(), cloud_bridge::run).context("cloud bridge failed")
        }
        Command::CheckConfig => {
            println!("configuration is valid: {}", load()?.summary());
            Ok(())
        }
        Command::Project => bail!(
            "the projector is a binary of its own now: run `projector serve --config projector.toml` \
             (deploy/projector.example.toml; its [kafka], [mongodb] and [redis] are this file's)"
        ),
    }
}
