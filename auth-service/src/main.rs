use std::io::BufRead;
use std::path::PathBuf;

use anyhow::{Context, bail};
use auth_service::store::{Account, AccountKind};
use auth_service::{self as auth, AuthServiceConfig};
use clap::{Parser, Subcommand};
use service_kit::clock::now_s;
use service_kit::config::ServiceConfig;
use service_kit::runtime::{self, Threads};
use service_kit::secrets;
use sync_protocol::ids::{NodeId, Role, UserId, WardId};

/// The auth service: OAuth2 tokens for staff, edge nodes and integrations,
/// and the admin commands that manage them.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[arg(long, env = "AUTH_SERVICE_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the token, revocation, introspection and key endpoints.
    Serve,
    /// Check the configuration file (with environment overrides) and exit.
    CheckConfig,
    /// Create a staff account; the password is read from the first line of stdin.
    AddUser {
        #[arg(long)]
        username: UserId,
        #[arg(long = "role", required = true)]
        roles: Vec<Role>,
        #[arg(long = "ward")]
        wards: Vec<WardId>,
    },
    /// Enrol an edge node: creates its client and prints its credentials, once.
    AddEdgeNode {
        #[arg(long)]
        node: NodeId,
        #[arg(long)]
        ward: WardId,
    },
    /// Create a client for an integration and print its credentials, once.
    AddClient {
        #[arg(long)]
        client_id: UserId,
        #[arg(long = "role", required = true)]
        roles: Vec<Role>,
        #[arg(long = "ward")]
        wards: Vec<WardId>,
    },
    /// Add a signing key; it is published now and signs after `key_publish_ahead_s`.
    RotateKey,
    /// Disable a staff account or a client (an edge node's, an
    /// integration's): it gets no token and logs in nowhere, and every
    /// service refuses its tokens and ends its open sessions within its
    /// `auth.refresh_interval_s`.
    DisableAccount {
        #[arg(long)]
        name: UserId,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let path = cli.config.context("--config (or AUTH_SERVICE_CONFIG) is required")?;
    let config = AuthServiceConfig::load(&path)?;
    match cli.command {
        Command::Serve => {
            let listen = config.listen;
            runtime::serve(config, listen, Threads::default(), auth::run).context("auth service failed")
        }
        Command::CheckConfig => {
            println!("configuration is valid: {}", config.summary());
            Ok(())
        }
        Command::AddUser { username, roles, wards } => {
            let mut password = String::new();
            std::io::stdin().lock().read_line(&mut password).context("cannot read the password from stdin")?;
            let password = password.trim_end_matches(['\r', '\n']);
            if password.chars().count() < 12 {
                bail!("the password must have at least 12 characters");
            }
            add_account(&config, username.as_str(), AccountKind::User, password, roles, wards)?;
            println!("user {username} created");
            Ok(())
        }
        Command::AddEdgeNode { node, ward } => {
            let secret = secrets::generate_secret();
            add_account(&config, node.as_str(), AccountKind::Client, &secret, vec![Role::EdgeNode], vec![ward])?;
            print_credentials(node.as_str(), &secret);
            Ok(())
        }
        Command::AddClient { client_id, roles, wards } => {
            let secret = secrets::generate_secret();
            add_account(&config, client_id.as_str(), AccountKind::Client, &secret, roles, wards)?;
            print_credentials(client_id.as_str(), &secret);
            Ok(())
        }
        Command::RotateKey => admin(async {
            let store = auth::open_store(&config).await?;
            let (kid, activates_at) = store.add_key(now_s() + config.tokens.key_publish_ahead_s).await?;
            println!("key {kid} published; it signs from {activates_at} (unix seconds)");
            Ok(())
        }),
        Command::DisableAccount { name } => admin(async {
            let store = auth::open_store(&config).await?;
            if !store.disable_account(name.as_str(), now_s()).await? {
                bail!("there is no account {name}");
            }
            println!("account {name} disabled: services refuse its tokens from their next revocation refresh");
            Ok(())
        }),
    }
}

/// Runs an admin command's storage work (MongoDB's driver is async).
fn admin(work: impl Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    runtime::block_on(work)?
}

fn add_account(
    config: &AuthServiceConfig,
    name: &str,
    kind: AccountKind,
    secret: &str,
    roles: Vec<Role>,
    wards: Vec<WardId>,
) -> anyhow::Result<()> {
    let secret_hash = secrets::hash_secret(secret)?;
    let account = Account { name: name.to_owned(), kind, secret_hash, roles, wards };
    admin(async {
        let store = auth::open_store(config).await?;
        store.add_account(&account, now_s()).await?;
        Ok(())
    })
}

/// Printed once: only the hash is kept.
fn print_credentials(client_id: &str, secret: &str) {
    println!("{}", serde_json::json!({ "client_id": client_id, "client_secret": secret }));
}
