use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use cloud_bridge::config::Config;

/// The cloud bridge: sync endpoint for edge nodes, pharmacy API.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
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
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let path = cli.config.context("--config (or CLOUD_BRIDGE_CONFIG) is required")?;
    let config = Config::load(&path)?;
    match cli.command {
        Command::Serve => serve(config),
        Command::CheckConfig => {
            println!("configuration is valid: bridge {}", config.bridge.id);
            Ok(())
        }
    }
}

fn serve(config: Config) -> anyhow::Result<()> {
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
