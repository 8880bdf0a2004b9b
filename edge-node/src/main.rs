use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use edge_node::config::Config;

/// The ward's edge node: serves ward devices, stores tickets, works offline.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the ward's devices.
    Serve {
        #[arg(long, env = "EDGE_NODE_CONFIG")]
        config: PathBuf,
    },
    /// Check a configuration file (with environment overrides) and exit.
    CheckConfig {
        #[arg(long, env = "EDGE_NODE_CONFIG")]
        config: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Serve { config } => serve(config),
        Command::CheckConfig { config } => {
            let config = Config::load(&config)?;
            println!("configuration is valid: node {} of {}", config.node.id, config.node.ward);
            Ok(())
        }
    }
}

fn serve(path: PathBuf) -> anyhow::Result<()> {
    let config = Config::load(&path)?;
    service_kit::logging::init(&config.log).map_err(anyhow::Error::msg)?;
    // Two workers: the node runs on small ward hardware, and the SQLite
    // writer has a thread of its own.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(16)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(config.http.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.http.listen))?;
        edge_node::run(config, listener, service_kit::shutdown::signal()).await.context("edge node failed")
    })
}
