use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use cloud_bridge::config::Config;

/// The cloud bridge: sync endpoint for edge nodes, pharmacy API.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve edge nodes and the pharmacy.
    Serve {
        #[arg(long, env = "CLOUD_BRIDGE_CONFIG")]
        config: PathBuf,
    },
    /// Check a configuration file (with environment overrides) and exit.
    CheckConfig {
        #[arg(long, env = "CLOUD_BRIDGE_CONFIG")]
        config: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Serve { config } => serve(config),
        Command::CheckConfig { config } => {
            let config = Config::load(&config)?;
            println!("configuration is valid: bridge {}", config.bridge.id);
            Ok(())
        }
    }
}

fn serve(path: PathBuf) -> anyhow::Result<()> {
    let config = Config::load(&path)?;
    service_kit::logging::init(&config.log).map_err(anyhow::Error::msg)?;
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the async runtime")?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(config.http.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.http.listen))?;
        cloud_bridge::run(config, listener, service_kit::shutdown::signal()).await.context("cloud bridge failed")
    })
}
