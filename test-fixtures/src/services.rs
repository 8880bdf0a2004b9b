//! The services of the distributed backend, as the environment names them:
//! `scripts/services start` prints these variables for the local services,
//! and pointing them at Apache Kafka, Atlas and a managed Redis runs the
//! same tests there.

use std::path::PathBuf;
use std::process::Command;

/// Where the tests find Kafka, MongoDB and Redis.
#[derive(Debug, Clone)]
pub struct Services {
    pub kafka_brokers: String,
    pub mongodb_uri: String,
    pub redis_url: String,
    /// A script that can `stop NAME`, `start NAME` and `restart NAME`
    /// (`scripts/services`); only the tests that restart services need it.
    control: Option<PathBuf>,
}

fn required(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the tests through scripts/test, or export what `scripts/services start` prints")
    })
}

impl Services {
    pub fn from_env() -> Self {
        Self {
            kafka_brokers: required("MEDSYNC_KAFKA_BROKERS"),
            mongodb_uri: required("MEDSYNC_MONGODB_URI"),
            redis_url: required("MEDSYNC_REDIS_URL"),
            control: std::env::var_os("MEDSYNC_SERVICES_CONTROL").map(PathBuf::from),
        }
    }

    /// The `[kafka]`, `[mongodb]` and `[redis]` sections of a bridge (and
    /// projector) configuration whose topic, database and
    /// Redis keys belong to `namespace` alone, so tests sharing the
    /// services do not see each other; projectors consume as `group`.
    pub fn sections(&self, namespace: &str, partitions: u32, group: &str) -> String {
        format!(
            r#"
[kafka]
brokers = "{brokers}"
topic = "{namespace}.changes"
partitions = {partitions}
group_id = "{group}"
delivery_timeout_ms = 5000
[mongodb]
uri = "{mongodb}"
database = "{namespace}"
[redis]
url = "{redis}"
key_prefix = "{namespace}"
"#,
            brokers = self.kafka_brokers,
            mongodb = self.mongodb_uri,
            redis = self.redis_url,
        )
    }

    /// Runs the control script's `verb` on service `name` (kafka, mongodb, redis).
    pub fn control(&self, verb: &str, name: &str) {
        let script = self
            .control
            .as_ref()
            .unwrap_or_else(|| panic!("MEDSYNC_SERVICES_CONTROL is not set: this test stops and starts services"));
        let status = Command::new(script).arg(verb).arg(name).status().expect("run the services script");
        assert!(status.success(), "{} {verb} {name} failed", script.display());
    }

    /// Starts every service again when dropped, so a test that stops them
    /// and fails leaves none stopped for the tests after it.
    pub fn restart_all_on_drop(&self) -> RestartOnDrop {
        RestartOnDrop(self.control.clone())
    }
}

#[derive(Debug)]
pub struct RestartOnDrop(Option<PathBuf>);

impl Drop for RestartOnDrop {
    fn drop(&mut self) {
        let Some(script) = &self.0 else { return };
        for name in ["kafka", "mongodb", "redis"] {
            // Never panics: this may run while a failed test unwinds.
            let _ = Command::new(script).arg("start").arg(name).stdout(std::process::Stdio::null()).status();
        }
    }
}

/// A fresh name for a test's topic, database and keys.
pub fn namespace(test: &str) -> String {
    format!("t{}-{test}", rand::random::<u32>())
}
