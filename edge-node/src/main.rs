use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use edge_node::backup;
use edge_node::cloud_auth::{self, ClientCredentials};
use edge_node::config::Config;
use service_kit::config::ServiceConfig;
use service_kit::runtime::{self, Threads};

/// The ward's edge node: serves ward devices, stores tickets, works offline.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[arg(long, env = "EDGE_NODE_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the ward's devices.
    Serve,
    /// Check the configuration file (with environment overrides) and exit.
    CheckConfig,
    /// Enrol the node with the auth service, once: reads the credentials
    /// printed by `auth-service add-edge-node` (a JSON file, or - for stdin).
    Enrol {
        #[arg(long)]
        credentials: PathBuf,
    },
    /// Take a consistent backup of the database into a new FILE, while the node serves.
    Backup { file: PathBuf },
    /// Replace the database with a backup (the node must be stopped). The
    /// node then re-syncs from the cloud what the backup lacks.
    Restore { file: PathBuf },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let path = cli.config.context("--config (or EDGE_NODE_CONFIG) is required")?;
    let config = Config::load(&path)?;
    match cli.command {
        Command::Serve => serve(config),
        Command::CheckConfig => {
            println!("configuration is valid: {}", config.summary());
            Ok(())
        }
        Command::Enrol { credentials } => {
            let text = if credentials.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin()).context("cannot read the credentials from stdin")?
            } else {
                std::fs::read_to_string(&credentials)
                    .with_context(|| format!("cannot read {}", credentials.display()))?
            };
            let credentials: ClientCredentials =
                serde_json::from_str(text.trim()).context("the credentials are not the JSON add-edge-node prints")?;
            let keys = runtime::block_on(cloud_auth::enrol(&config, &credentials))??;
            println!(
                "node {} enrolled: credentials and {keys} signing key(s) stored in {}",
                config.node.id,
                config.node.data_dir.display()
            );
            Ok(())
        }
        Command::Backup { file } => {
            let summary = backup::backup(&config.database_path(), &file)?;
            println!(
                "backup written to {}: {} tickets, {} changes not yet synced",
                file.display(),
                summary.tickets,
                summary.outbox
            );
            Ok(())
        }
        Command::Restore { file } => {
            let (summary, kept) = backup::restore(&config.node.data_dir, &config.database_path(), &file)?;
            println!(
                "restored {}: {} tickets, {} changes not yet synced; the node re-syncs from the cloud when it starts",
                file.display(),
                summary.tickets,
                summary.outbox
            );
            if let Some(kept) = kept {
                println!("the database it replaced is kept as {}", kept.display());
            }
            Ok(())
        }
    }
}

fn serve(config: Config) -> anyhow::Result<()> {
    // Two workers: the node runs on small ward hardware, and the SQLite
    // writer has a thread of its own.
    let threads = Threads { workers: Some(2), blocking_max: Some(16) };
    let listen = config.http.listen;
    runtime::serve(config, listen, threads, edge_node::run).context("edge node failed")
}
