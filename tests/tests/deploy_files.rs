//! The files operators run the cloud side with (no container engine runs
//! here, so they are checked, not run): the compose file and the Kubernetes
//! manifests parse, name every service the operator's guide mentions, and
//! the configuration each hands a service passes that service's own
//! `check-config`.
#![allow(clippy::unwrap_used)] // test code: a failure is the test failing

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use test_fixtures::process::binary;
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

/// Runs `program --config config check-config` with `env`; panics with its
/// output unless it passes, and returns what it printed.
fn check_config(program: &str, config: &Path, env: &[(String, String)], what: &str) -> String {
    let output = Command::new(binary(program))
        .arg("--config")
        .arg(config)
        .arg("check-config")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert!(output.status.success(), "{what}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn string(value: &Value) -> String {
    value.as_str().map(str::to_owned).unwrap_or_else(|| panic!("not a string: {value:?}"))
}

#[test]
fn the_compose_file_runs_every_service_of_the_guide_with_a_valid_configuration() {
    let compose = &yaml_documents(&deploy().join("compose.yaml"))[0];
    let services = compose["services"].as_mapping().unwrap();
    let guide = std::fs::read_to_string(deploy().join("README.md")).unwrap();
    for name in ["kafka", "mongodb", "redis", "auth-service", "bridge-1", "bridge-2", "projector"] {
        assert!(guide.contains(name), "the guide does not mention {name}");
        let service = services.get(name).unwrap_or_else(|| panic!("compose has no service {name}"));
        assert!(
            service["healthcheck"]["test"].as_sequence().is_some_and(|t| !t.is_empty()),
            "{name} has no health check"
        );
    }
    for (name, program, subcommand) in [
        ("auth-service", "auth-service", "serve"),
        ("bridge-1", "cloud-bridge", "serve"),
        ("bridge-2", "cloud-bridge", "serve"),
        ("projector", "projector", "serve"),
    ] {
        let service = &services[name];
        assert_eq!(service["image"].as_str(), Some("medsync:latest"), "{name}");
        let command: Vec<String> = service["command"].as_sequence().unwrap().iter().map(string).collect();
        assert_eq!(command[0], program, "{name}");
        assert_eq!(command.last().map(String::as_str), Some(subcommand), "{name}");
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
        let output = check_config(program, &file, &env, name);
        if program == "auth-service" {
            assert!(output.contains("mongodb, rate limits in redis"), "{name}: {output}");
        }
        if program == "projector" {
            assert!(output.contains("projector projector-1, topic medsync.changes"), "{name}: {output}");
            assert!(output.contains("notices in redis"), "{name}: {output}");
        }
        if program == "cloud-bridge" {
            assert!(output.contains("distributed store: kafka, mongodb, redis"), "{name}: {output}");
            let depends = service["depends_on"].as_mapping().unwrap();
            for needed in ["auth-service", "kafka", "mongodb", "redis"] {
                assert_eq!(depends[needed]["condition"].as_str(), Some("service_healthy"), "{name} on {needed}");
            }
        }
    }
}

#[test]
fn the_kubernetes_manifests_parse_and_carry_valid_configurations() {
    let manifests = |file: &str| yaml_documents(&deploy().join("kubernetes").join(file));
    for (file, kinds, program, subcommand) in [
        ("auth-service.yaml", &["ConfigMap", "Deployment", "Service"][..], "auth-service", "serve"),
        ("cloud-bridge.yaml", &["ConfigMap", "Deployment", "Service"][..], "cloud-bridge", "serve"),
        ("projector.yaml", &["ConfigMap", "Deployment"][..], "projector", "serve"),
    ] {
        let documents = manifests(file);
        let found: Vec<String> = documents.iter().map(|d| string(&d["kind"])).collect();
        assert_eq!(found, kinds, "{file}");
        for document in &documents {
            assert!(document["apiVersion"].as_str().is_some() && document["metadata"]["name"].as_str().is_some());
        }
        let workload = documents.iter().find(|d| d["kind"] != "ConfigMap" && d["kind"] != "Service").unwrap();
        let pod = &workload["spec"]["template"]["spec"];
        let container = &pod["containers"][0];
        let args: Vec<String> = container["args"].as_sequence().unwrap().iter().map(string).collect();
        assert_eq!((args[0].as_str(), args.last().map(String::as_str)), (program, Some(subcommand)), "{file}");
        assert!(container["readinessProbe"]["httpGet"]["path"].as_str().is_some(), "{file}: no readiness probe");
        // The configuration it mounts, from the ConfigMap it names.
        let config_map = string(&pod["volumes"].as_sequence().unwrap()[0]["configMap"]["name"]);
        let source =
            if config_map == "cloud-bridge-config" { manifests("cloud-bridge.yaml") } else { documents.clone() };
        let data =
            &source.iter().find(|d| d["metadata"]["name"].as_str() == Some(config_map.as_str())).unwrap()["data"];
        let (key, text) = data.as_mapping().unwrap().iter().next().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join(string(key));
        std::fs::write(&config, string(text)).unwrap();
        check_config(program, &config, &[], file);
    }
}

/// `cloud-bridge project` ran the projector before it was a binary of its
/// own: the old command line fails and says what replaced it.
#[test]
fn the_old_projector_command_names_the_projector_binary() {
    let example = deploy().join("cloud-bridge.example.toml");
    let output = Command::new(binary("cloud-bridge")).arg("--config").arg(&example).arg("project").output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("run `projector serve --config projector.toml`"), "{stderr}");
    let checked = check_config("projector", &deploy().join("projector.example.toml"), &[], "projector example");
    assert!(checked.contains("configuration is valid: projector projector-1"), "{checked}");
}
