use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use edge_node::backup;
use edge_node::cloud_auth::{self, ClientCredentials};
use edge_node::config::Config;
use service_kit::config::ServiceConfig;
use service_kit::runtime::{self, Threads};
use service_kit::sqlite::{Database, DatabaseKey};

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
    /// Take a consistent backup of the database into a new FILE, while the
    /// node serves. It is encrypted with the database's key.
    Backup { file: PathBuf },
    /// Replace the database with a backup (the node must be stopped). The
    /// node then re-syncs from the cloud what the backup lacks.
    Restore {
        file: PathBuf,
        /// The key the backup was made under, if not the current one (a
        /// backup from before a key rotation).
        #[arg(long)]
        key_file: Option<PathBuf>,
    },
    /// Write a new random database key into the new FILE (mode 0600).
    GenerateKey { file: PathBuf },
    /// Re-encrypt the database under the key in FILE (the node must be
    /// stopped): a key rotation, or the first encryption of a plain database.
    RotateKey {
        #[arg(long)]
        new_key_file: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let Cli { config: path, command } = Cli::parse();
    let load = || -> anyhow::Result<Config> {
        let path = path.as_ref().context("--config (or EDGE_NODE_CONFIG) is required")?;
        Ok(Config::load(path)?)
    };
    match command {
        Command::Serve => serve(load()?),
        Command::CheckConfig => {
            let config = load()?;
            // The key is read too: a missing or exposed key stops the unit here.
            let encryption = match (config.database()?.key, config.storage.key_path()) {
                (Some(_), Some(path)) => format!("database encrypted with the key in {}", path.display()),
                _ => "database NOT encrypted (no storage.key_file)".to_owned(),
            };
            println!("configuration is valid: {}; {encryption}", config.summary());
            Ok(())
        }
        Command::Enrol { credentials } => {
            let config = load()?;
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
            let config = load()?;
            let summary = backup::backup(&config.database()?, &file)?;
            println!(
                "backup written to {}: {} tickets, {} changes not yet synced",
                file.display(),
                summary.tickets,
                summary.outbox
            );
            Ok(())
        }
        Command::Restore { file, key_file } => {
            let config = load()?;
            let database = config.database()?;
            let key = match key_file {
                Some(path) => Some(DatabaseKey::read(&path)?),
                None => database.key.clone(),
            };
            let from = Database { path: file.clone(), key };
            let (summary, kept) = backup::restore(&config.node.data_dir, &database, &from)
                .context("restore failed (a backup made under another key needs --key-file)")?;
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
        // Needs no configuration: the installer runs it before writing one.
        Command::GenerateKey { file } => {
            DatabaseKey::generate().write_new(&file)?;
            println!("wrote a new database key to {} (mode 0600)", file.display());
            Ok(())
        }
        Command::RotateKey { new_key_file } => {
            let config = load()?;
            let new_key = DatabaseKey::read(&new_key_file)?;
            let summary = backup::rotate_key(&config.node.data_dir, &config.database()?, new_key)?;
            println!(
                "database re-encrypted under {}: {} tickets, {} changes not yet synced",
                new_key_file.display(),
                summary.tickets,
                summary.outbox
            );
            println!(
                "next: point storage.key_file (or the key credential) at that key before starting the node; \
                 keep the old key with the backups made before now (restore them with --key-file)"
            );
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
