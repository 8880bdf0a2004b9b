//! FHIR R4 validation against HL7's StructureDefinitions, by Medplum's
//! validator in `tests/fhir-validator` (Node.js; `scripts/test` installs
//! it from the npm registry with its lock file).

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

fn validator() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fhir-validator")
}

/// Validates a resource (a Bundle's entries too). `Err` holds the issues
/// the validator printed, one JSON object per line.
pub fn validate_r4(resource: &serde_json::Value) -> Result<(), String> {
    let dir = validator();
    assert!(
        dir.join("node_modules/@medplum/core").is_dir(),
        "the FHIR validator is not installed: run `npm ci` in {} (scripts/test does)",
        dir.display()
    );
    let mut child = Command::new("node")
        .arg("validate.mjs")
        .current_dir(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node runs (Node.js 20 or later)");
    let input = serde_json::to_vec(resource).expect("JSON serializes");
    child.stdin.take().expect("stdin is piped").write_all(&input).expect("the validator reads its input");
    let output = child.wait_with_output().expect("the validator ends");
    let printed = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    if output.status.success() { Ok(()) } else { Err(printed) }
}
