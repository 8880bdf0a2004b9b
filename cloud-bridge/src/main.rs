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
    /// Project the change topic into MongoDB (distributed backend; run one
    /// or more beside the bridges, they share the topic's partitions).
    Project,
    /// Check the configuration file (with environment overrides) and exit.
    CheckConfig,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let path = cli.config.context("--config (or CLOUD_BRIDGE_CONFIG) is required")?;
    let config = Config::load(&path)?;
    match cli.command {
        Command::Serve => serve(config),
        Command::Project => project(config),
        Command::CheckConfig => {
            let backend = match (&config.kafka, &config.redis) {
                (None, _) => "embedded store",
                (Some(_), Some(_)) => "distributed store: kafka, mongodb, redis",
                (Some(_), None) => "distributed store: kafka, mongodb (no redis)",
            };
            println!("configuration is valid: bridge {}, {backend}", config.bridge.id);
            Ok(())
        }
    }
}

fn runtime(config: &Config) -> anyhow::Result<tokio::runtime::Runtime> {
    service_kit::logging::init(&config.log).map_err(anyhow::Error::msg)?;
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the async runtime")
}

fn project(config: Config) -> anyhow::Result<()> {
    if config.kafka.is_none() {
        anyhow::bail!("the projector serves the distributed backend: configure [kafka] and [mongodb]");
    }
    runtime(&config)?.block_on(async {
        let listen = config.projector.listen;
        let listener =
            tokio::net::TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
        cloud_bridge::project(config, listener, service_kit::shutdown::signal()).await.context("projector failed")
    })
}

fn serve(config: Config) -> anyhow::Result<()> {
    runtime(&config)?.block_on(async {
        let listener = tokio::net::TcpListener::bind(config.http.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.http.listen))?;
        cloud_bridge::run(config, listener, service_kit::shutdown::signal()).await.context("cloud bridge failed")
    })
}
