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

/// A running `edge-node serve`, killed when dropped.
#[derive(Debug)]
pub struct EdgeNodeProcess {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    config_path: PathBuf,
}

/// The configuration of a test node in `data_dir`; `extra` is appended TOML.
pub fn edge_config(data_dir: &Path, node: &str, ward: &str, extra: &str) -> String {
    format!(
        r#"
version = 1
[node]
id = "{node}"
ward = "{ward}"
data_dir = "{data_dir}"
[http]
listen = "127.0.0.1:0"
[auth]
issuer = "{ISSUER}"
audience = "{AUDIENCE}"
[log]
format = "json"
filter = "info"
{extra}
"#,
        data_dir = data_dir.display()
    )
}

impl EdgeNodeProcess {
    /// Writes a config and the JWKS into `data_dir` and starts a node there.
    pub fn start(data_dir: &Path, node: &str, ward: &str, jwks: &Value, extra: &str) -> Self {
        std::fs::create_dir_all(data_dir).expect("create the data directory");
        std::fs::write(data_dir.join("jwks.json"), jwks.to_string()).expect("write the jwks");
        let config_path = data_dir.join("edge-node.toml");
        std::fs::write(&config_path, edge_config(data_dir, node, ward, extra)).expect("write the config");
        Self::start_with(data_dir, &config_path)
    }

    fn start_with(data_dir: &Path, config_path: &Path) -> Self {
        let mut child = Command::new(binary("edge-node"))
            .arg("serve")
            .arg("--config")
            .arg(config_path)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start edge-node");
        let stdout = child.stdout.take().expect("stdout is piped");
        let addr = follow_log(stdout, data_dir.join("edge-node.log"), "edge node serving");
        Self { child: Some(child), addr, data_dir: data_dir.to_path_buf(), config_path: config_path.to_path_buf() }
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

    /// Starts the node again on its data directory (on a new port).
    pub fn restart(&mut self) {
        self.kill9();
        *self = Self::start_with(&self.data_dir.clone(), &self.config_path.clone());
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for EdgeNodeProcess {
    fn drop(&mut self) {
        self.kill9();
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
