//! The edge node's installer, run into a temporary root as IT runs it on
//! ward hardware: the installed binary starts from the installed
//! configuration and serves; the systemd unit passes `systemd-analyze
//! verify`; the database is encrypted with the key the installer made;
//! a second run keeps what the first one set up.
#![allow(clippy::unwrap_used)] // test code: a failure is the test failing

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use serde_json::json;
use test_fixtures::TestIssuer;
use test_fixtures::process::{ServiceProcess, binary};

const WARD: &str = "ward-4b";

fn install(root: &Path) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/install-edge-node.sh");
    let user = String::from_utf8(Command::new("id").arg("-un").output().unwrap().stdout).unwrap();
    let output = Command::new("bash")
        .arg(script)
        .args(["--binary", binary("edge-node").to_str().unwrap(), "--node", "edge-ward-4b", "--ward", WARD])
        .env("ROOT", root)
        .env("SERVICE_USER", user.trim())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "install failed: {stdout}{}", String::from_utf8_lossy(&output.stderr));
    stdout
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn the_installed_node_starts_from_its_installed_configuration_and_serves() {
    let root = tempfile::tempdir().unwrap();
    install(root.path());
    let (program, config, data_dir, unit, key) = (
        root.path().join("usr/local/bin/edge-node"),
        root.path().join("etc/edge-node/edge-node.toml"),
        root.path().join("var/lib/edge-node"),
        root.path().join("etc/systemd/system/edge-node.service"),
        root.path().join("etc/edge-node/database.key"),
    );
    assert_eq!(mode(&program), 0o755);
    assert_eq!(mode(&data_dir), 0o750, "the data directory is the service user's alone");
    assert_eq!(mode(&config), 0o640);
    assert_eq!(mode(&key), 0o400, "the database key is the service user's alone");
    let config_text = std::fs::read_to_string(&config).unwrap();
    assert!(config_text.contains(&format!("key_file = \"{}\"", key.display())), "{config_text}");
    let unit_text = std::fs::read_to_string(&unit).unwrap();
    for expected in [
        format!("ExecStart={} --config {} serve", program.display(), config.display()),
        format!("ReadWritePaths={}", data_dir.display()),
        format!("LoadCredential=database-key:{}", key.display()),
        "NoNewPrivileges=yes".into(),
        "ProtectSystem=strict".into(),
        "PrivateTmp=yes".into(),
        "Restart=on-failure".into(),
    ] {
        assert!(unit_text.contains(&expected), "the unit lacks {expected}:\n{unit_text}");
    }
    if Command::new("systemd-analyze").arg("--version").output().is_ok() {
        let verify = Command::new("systemd-analyze").arg("verify").arg(&unit).output().unwrap();
        let complaints = String::from_utf8_lossy(&verify.stderr);
        assert!(verify.status.success() && complaints.trim().is_empty(), "systemd-analyze verify: {complaints}");
    }

    // IT enrols the node (here: the key set placed by hand) and starts it.
    let issuer = TestIssuer::new("key-1");
    std::fs::write(data_dir.join("jwks.json"), issuer.jwks().to_string()).unwrap();
    let node = ServiceProcess::start_installed(
        &program,
        &config,
        &data_dir,
        &[("EDGE_NODE__HTTP__LISTEN", "127.0.0.1:0"), ("EDGE_NODE__AUTH__ISSUER", test_fixtures::issuer::ISSUER)],
    );
    let client = reqwest::Client::new();
    assert_eq!(client.get(node.url("/healthz")).send().await.unwrap().text().await.unwrap(), "ok");
    let ticket = json!({ "items": [{ "medication_code": "AMOX-500", "quantity": 20, "unit": "capsule" }], "priority": "urgent" });
    let created =
        client.post(node.url("/api/v1/tickets")).bearer_auth(issuer.nurse(WARD)).json(&ticket).send().await.unwrap();
    assert_eq!(created.status(), 201);
    assert!(data_dir.join("edge-node.sqlite3").exists(), "the database lives in the data directory");
    drop(node);
    for file in ["edge-node.sqlite3", "edge-node.sqlite3-wal"] {
        let stored = std::fs::read(data_dir.join(file)).unwrap_or_default();
        assert!(!stored.windows(8).any(|bytes| bytes == b"AMOX-500"), "{file} is encrypted");
    }
    let checked = Command::new(&program).arg("--config").arg(&config).arg("check-config").output().unwrap();
    let checked = String::from_utf8_lossy(&checked.stdout);
    assert!(checked.contains(&format!("database encrypted with the key in {}", key.display())), "{checked}");
    let key_text = std::fs::read(&key).unwrap();

    // Installing again keeps the configuration and the data.
    std::fs::write(&config, std::fs::read_to_string(&config).unwrap() + "\n# edited by IT\n").unwrap();
    let again = install(root.path());
    assert!(again.contains("kept the existing configuration"), "{again}");
    assert!(again.contains("kept the existing database key"), "{again}");
    assert_eq!(std::fs::read(&key).unwrap(), key_text, "the key is never replaced");
    assert!(std::fs::read_to_string(&config).unwrap().contains("# edited by IT"));
    assert!(data_dir.join("edge-node.sqlite3").exists());
}
