//! Launchers for the service binaries built by this workspace.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

use crate::issuer::{AUDIENCE, ISSUER};

/// How long a process may take to start serving.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The path of a binary of this workspace, beside the running test or bench.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the running executable has a path");
    let mut dir = exe.parent().expect("an executable lives in a directory").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(path.exists(), "{} is missing: build it first (cargo build -p {name})", path.display());
    path
}

/// What to run and how to know it is up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kind {
    pub binary: &'static str,
    pub subcommand: &'static str,
    /// The log message, with the listening `address`, that says it serves.
    pub ready_message: &'static str,
    /// Its log in the data directory: `<log_name>.log`.
    pub log_name: &'static str,
}

pub const EDGE_NODE: Kind =
    Kind { binary: "edge-node", subcommand: "serve", ready_message: "edge node serving", log_name: "edge-node" };
pub const BRIDGE: Kind = Kind {
    binary: "cloud-bridge",
    subcommand: "serve",
    ready_message: "cloud bridge serving",
    log_name: "cloud-bridge",
};
pub const PROJECTOR: Kind =
    Kind { binary: "projector", subcommand: "serve", ready_message: "projector serving", log_name: "projector" };
pub const AUTH_SERVICE: Kind = Kind {
    binary: "auth-service",
    subcommand: "serve",
    ready_message: "auth service serving",
    log_name: "auth-service",
};

/// A running service binary (`edge-node serve`, `cloud-bridge serve`), killed when dropped.
#[derive(Debug)]
pub struct ServiceProcess {
    kind: Kind,
    child: Option<Child>,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    config_path: PathBuf,
}

pub type EdgeNodeProcess = ServiceProcess;
pub type BridgeProcess = ServiceProcess;

/// The configuration of a test bridge in `data_dir` listening on `listen`.
pub fn bridge_config(data_dir: &Path, listen: &str, extra: &str) -> String {
    bridge_config_with_auth(data_dir, listen, "", extra)
}

/// Like [`bridge_config`], with `auth_extra` added to the `[auth]` section.
pub fn bridge_config_with_auth(data_dir: &Path, listen: &str, auth_extra: &str, extra: &str) -> String {
    named_bridge_config("bridge-1", data_dir, listen, auth_extra, extra)
}

/// The configuration of bridge instance `id`.
pub fn named_bridge_config(id: &str, data_dir: &Path, listen: &str, auth_extra: &str, extra: &str) -> String {
    format!(
        r#"
version = 1
[bridge]
id = "{id}"
data_dir = "{data_dir}"
[http]
listen = "{listen}"
[auth]
issuer = "{ISSUER}"
audience = "{AUDIENCE}"
{auth_extra}
[log]
format = "json"
filter = "info"
{extra}
"#,
        data_dir = data_dir.display()
    )
}

/// The configuration of a projector named `id` with its health on `listen`;
/// `sections` are the `[kafka]`, `[mongodb]` and `[redis]` it shares with the bridges.
pub fn projector_config(id: &str, listen: &str, sections: &str) -> String {
    format!(
        r#"
version = 1
[projector]
id = "{id}"
listen = "{listen}"
[log]
format = "json"
filter = "info"
{sections}
"#
    )
}

/// The configuration of a test node in `data_dir` on a free port; `extra` is appended TOML.
pub fn edge_config(data_dir: &Path, node: &str, ward: &str, extra: &str) -> String {
    edge_config_on(data_dir, node, ward, "127.0.0.1:0", extra)
}

/// The configuration of a node in `data_dir` listening on `listen`.
pub fn edge_config_on(data_dir: &Path, node: &str, ward: &str, listen: &str, extra: &str) -> String {
    edge_config_with_auth(data_dir, node, ward, listen, "", extra)
}

/// The database key of every test node: one for all, so a database copied
/// from one test node's directory to another's opens there, as a copy of a
/// ward's disk with its key would.
pub const EDGE_DATABASE_KEY: &str = "5e1f0c2a9b7d4e6f8a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f";

/// Writes [`EDGE_DATABASE_KEY`] into `data_dir/database.key` (mode 0600)
/// unless it is there; returns its path.
pub fn edge_key_file(data_dir: &Path) -> PathBuf {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join("database.key");
    std::fs::create_dir_all(data_dir).expect("create the node's data directory");
    match std::fs::File::options().write(true).create_new(true).mode(0o600).open(&path) {
        Ok(mut file) => file.write_all(EDGE_DATABASE_KEY.as_bytes()).expect("write the test key"),
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(error) => panic!("{}: {error}", path.display()),
    }
    path
}

/// Like [`edge_config_on`], with `auth_extra` added to the `[auth]` section.
/// The database is encrypted with [`EDGE_DATABASE_KEY`], as on a ward.
pub fn edge_config_with_auth(
    data_dir: &Path,
    node: &str,
    ward: &str,
    listen: &str,
    auth_extra: &str,
    extra: &str,
) -> String {
    let key_file = edge_key_file(data_dir);
    format!(
        r#"
version = 1
[node]
id = "{node}"
ward = "{ward}"
data_dir = "{data_dir}"
[http]
listen = "{listen}"
[storage]
key_file = "{key_file}"
[auth]
issuer = "{ISSUER}"
audience = "{AUDIENCE}"
{auth_extra}
[log]
format = "json"
filter = "info"
{extra}
"#,
        data_dir = data_dir.display(),
        key_file = key_file.display()
    )
}

/// The configuration of a test auth service in `data_dir` listening on `listen`.
pub fn auth_config(data_dir: &Path, listen: &str) -> String {
    format!(
        r#"
version = 1
issuer = "{ISSUER}"
audience = "{AUDIENCE}"
data_dir = "{data_dir}"
listen = "{listen}"
[log]
format = "json"
filter = "info"
"#,
        data_dir = data_dir.display()
    )
}

/// Runs an `auth-service` admin command on `config` with `stdin`; returns its stdout.
pub fn auth_admin(config: &Path, args: &[&str], stdin: &str) -> String {
    let mut child = Command::new(binary("auth-service"))
        .arg("--config")
        .arg(config)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start auth-service");
    child.stdin.take().expect("stdin is piped").write_all(stdin.as_bytes()).expect("write stdin");
    let output = child.wait_with_output().expect("auth-service ran");
    assert!(output.status.success(), "auth-service {args:?} failed");
    String::from_utf8(output.stdout).expect("utf-8 output")
}

impl ServiceProcess {
    /// Starts an auth service with the configuration at `config_path`.
    pub fn start_auth(data_dir: &Path, config_path: &Path) -> Self {
        Self::start_kind(AUTH_SERVICE, data_dir, config_path)
    }

    /// Writes `config` and the JWKS into `data_dir` and starts `binary` there.
    pub fn launch_with_config(binary: &'static str, data_dir: &Path, jwks: &Value, config: &str) -> Self {
        let kind = if binary == EDGE_NODE.binary { EDGE_NODE } else { BRIDGE };
        Self::launch(kind, data_dir, jwks, config)
    }

    /// Writes a config and the JWKS into `data_dir` and starts an edge node there.
    pub fn start(data_dir: &Path, node: &str, ward: &str, jwks: &Value, extra: &str) -> Self {
        Self::start_on(data_dir, node, ward, "127.0.0.1:0", jwks, extra)
    }

    /// Like [`Self::start`], listening on `listen`.
    pub fn start_on(data_dir: &Path, node: &str, ward: &str, listen: &str, jwks: &Value, extra: &str) -> Self {
        let config = edge_config_on(data_dir, node, ward, listen, extra);
        Self::launch(EDGE_NODE, data_dir, jwks, &config)
    }

    /// Writes a config and the JWKS into `data_dir` and starts a bridge on `listen`.
    pub fn start_bridge(data_dir: &Path, listen: &str, jwks: &Value, extra: &str) -> Self {
        let config = bridge_config(data_dir, listen, extra);
        Self::launch(BRIDGE, data_dir, jwks, &config)
    }

    /// Writes `config` and the JWKS into `data_dir` and starts `kind` there.
    pub fn launch(kind: Kind, data_dir: &Path, jwks: &Value, config: &str) -> Self {
        std::fs::create_dir_all(data_dir).expect("create the data directory");
        std::fs::write(data_dir.join("jwks.json"), jwks.to_string()).expect("write the jwks");
        let config_path = data_dir.join(format!("{}.toml", kind.log_name));
        std::fs::write(&config_path, config).expect("write the config");
        Self::start_kind(kind, data_dir, &config_path)
    }

    /// Starts an installed edge node (`program`) with `config` and
    /// environment overrides.
    pub fn start_installed(program: &Path, config_path: &Path, data_dir: &Path, env: &[(&str, &str)]) -> Self {
        let mut command = Command::new(program);
        command.envs(env.iter().copied());
        Self::spawn(command, EDGE_NODE, data_dir, config_path)
    }

    fn start_kind(kind: Kind, data_dir: &Path, config_path: &Path) -> Self {
        Self::spawn(Command::new(binary(kind.binary)), kind, data_dir, config_path)
    }

    fn spawn(mut command: Command, kind: Kind, data_dir: &Path, config_path: &Path) -> Self {
        let mut child = command
            .arg(kind.subcommand)
            .arg("--config")
            .arg(config_path)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", kind.binary));
        let stdout = child.stdout.take().expect("stdout is piped");
        let addr = follow_log(stdout, data_dir.join(format!("{}.log", kind.log_name)), kind.ready_message);
        Self {
            kind,
            child: Some(child),
            addr,
            data_dir: data_dir.to_path_buf(),
            config_path: config_path.to_path_buf(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// SIGKILL: no shutdown code runs, as in a power cut of the process.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, and waits for the process to exit.
    pub fn terminate(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        child.wait().ok()
    }

    /// Starts the process again on its data directory and configuration.
    pub fn restart(&mut self) {
        self.kill9();
        *self = Self::start_kind(self.kind, &self.data_dir.clone(), &self.config_path.clone());
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

/// Log lines of a process shown when a test fails while it runs.
const FAILURE_LOG_LINES: usize = 40;

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        self.kill9();
        // A failing test deletes its temporary directory, and the log with
        // it: show the end of the log, which usually says why.
        if std::thread::panicking() {
            let path = self.data_dir.join(format!("{}.log", self.kind.log_name));
            let log = std::fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!("--- last lines of {} ({}):", self.kind.log_name, path.display());
            for line in &lines[lines.len().saturating_sub(FAILURE_LOG_LINES)..] {
                eprintln!("{line}");
            }
        }
    }
}

/// Copies a process's JSON log lines to `log_path` and returns the address
/// from the first line whose message is `ready_message`.
fn follow_log(stdout: std::process::ChildStdout, log_path: PathBuf, ready_message: &'static str) -> SocketAddr {
    let (found, address) = mpsc::channel();
    std::thread::spawn(move || {
        let mut log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).ok();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(log) = log.as_mut() {
                let _ = writeln!(log, "{line}");
            }
            let Ok(entry) = serde_json::from_str::<Value>(&line) else { continue };
            let address = entry["address"].as_str().and_then(|a| a.parse::<SocketAddr>().ok());
            // Only the first send is received; later ones fail harmlessly.
            if entry["message"] == ready_message
                && let Some(addr) = address
            {
                let _ = found.send(addr);
            }
        }
    });
    address.recv_timeout(START_TIMEOUT).expect("the process started serving in time (see its log)")
}
