//! The files operators run the cloud side with (no container engine runs
//! here, so they are checked, not run): the compose file and the Kubernetes
//! manifests parse, name every service the operator's guide mentions, and
//! the configuration each hands a service passes that service's own
//! `check-config`.
#![allow(clippy::unwrap_used)] // test code: a failure is the test failing

use std::path::{Path, PathBuf};
use std::process::Command;

use e2e::process::binary;
use serde::Deserialize;
use yaml_serde::Value;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn yaml_documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    yaml_serde::Deserializer::from_str(&text)
        .map(|document| {
            let mut value = Value::deserialize(document).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            value.apply_merge().unwrap();
            value
        })
        .collect()
}

/// Runs `program --config config check-config` with `env`; panics with its output unless it passes.
fn check_config(program: &str, config: &Path, env: &[(String, String)], what: &str) {
    let output = Command::new(binary(program))
        .arg("--config")
        .arg(config)
        .arg("check-config")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert!(output.status.success(), "{what}: {}", String::from_utf8_lossy(&output.stderr));
}

fn string(value: &Value) -> String {
    value.as_str().map(str::to_owned).unwrap_or_else(|| panic!("not a string: {value:?}"))
}

#[test]
fn the_compose_file_runs_every_service_of_the_guide_with_a_valid_configuration() {
    let compose = &yaml_documents(&deploy().join("compose.yaml"))[0];
    let services = compose["services"].as_mapping().unwrap();
    let guide = std::fs::read_to_string(deploy().join("README.md")).unwrap();
    for (name, program) in [("auth-service", "auth-service"), ("cloud-bridge", "cloud-bridge")] {
        assert!(guide.contains(name), "the guide does not mention {name}");
        let service = services.get(name).unwrap_or_else(|| panic!("compose has no service {name}"));
        assert_eq!(service["image"].as_str(), Some("medsync:latest"), "{name}");
        assert!(
            service["healthcheck"]["test"].as_sequence().is_some_and(|t| !t.is_empty()),
            "{name} has no health check"
        );
        let command: Vec<String> = service["command"].as_sequence().unwrap().iter().map(string).collect();
        assert_eq!(command[0], program, "{name}");
        assert_eq!(command.last().map(String::as_str), Some("serve"), "{name}");
        // The configuration file it mounts, with the environment it sets.
        let mounted = service["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(string)
            .find(|volume| volume.starts_with("./"))
            .unwrap();
        let file = deploy().join(mounted.trim_start_matches("./").split(':').next().unwrap());
        let env: Vec<(String, String)> =
            service["environment"].as_mapping().unwrap().iter().map(|(k, v)| (string(k), string(v))).collect();
        check_config(program, &file, &env, name);
    }
    let bridge = &services["cloud-bridge"];
    assert_eq!(bridge["depends_on"]["auth-service"]["condition"].as_str(), Some("service_healthy"));
}

#[test]
fn the_kubernetes_manifests_parse_and_carry_valid_configurations() {
    for (file, program, config_key) in [
        ("auth-service.yaml", "auth-service", "auth-service.toml"),
        ("cloud-bridge.yaml", "cloud-bridge", "cloud-bridge.toml"),
    ] {
        let documents = yaml_documents(&deploy().join("kubernetes").join(file));
        let kinds: Vec<String> = documents.iter().map(|d| string(&d["kind"])).collect();
        assert_eq!(kinds, ["ConfigMap", "StatefulSet", "Service"], "{file}");
        for document in &documents {
            assert!(document["apiVersion"].as_str().is_some() && document["metadata"]["name"].as_str().is_some());
        }
        let container = &documents[1]["spec"]["template"]["spec"]["containers"][0];
        let args: Vec<String> = container["args"].as_sequence().unwrap().iter().map(string).collect();
        assert_eq!((args[0].as_str(), args.last().map(String::as_str)), (program, Some("serve")), "{file}");
        assert!(container["readinessProbe"]["httpGet"]["path"].as_str().is_some(), "{file}: no readiness probe");
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join(config_key);
        std::fs::write(&config, string(&documents[0]["data"][config_key])).unwrap();
        check_config(program, &config, &[], file);
    }
}
