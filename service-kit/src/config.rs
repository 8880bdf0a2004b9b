//! One way to load and check every service's configuration: a versioned
//! TOML file (or text), then environment overrides under the service's
//! prefix with `__` between levels (`EDGE_NODE__HTTP__LISTEN=...`), then
//! the checks every service shares (version, absolute data directory, a
//! log filter that parses) and the service's own. Unknown fields are
//! refused by the services' types (`deny_unknown_fields`).
//!
//! `serve` and `check-config` go through the same [`ServiceConfig::load`],
//! so a file `check-config` passes is one `serve` reads.

use std::path::Path;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::de::DeserializeOwned;

use crate::logging::LogConfig;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration: {0}")]
    Load(#[from] Box<figment::Error>),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl ConfigError {
    pub fn invalid(message: impl Into<String>) -> Self {
        ConfigError::Invalid(message.into())
    }
}

/// Where the configuration text comes from.
#[derive(Debug, Clone, Copy)]
pub enum Source<'a> {
    File(&'a Path),
    Text(&'a str),
}

/// Reads `source`, applies `PREFIX` environment overrides, and deserializes.
fn extract<T: DeserializeOwned>(source: Source<'_>, env_prefix: &str) -> Result<T, ConfigError> {
    let figment = match source {
        Source::File(path) => Figment::new().merge(Toml::file_exact(path)),
        Source::Text(text) => Figment::new().merge(Toml::string(text)),
    };
    Ok(figment.merge(Env::prefixed(env_prefix).split("__")).extract().map_err(Box::new)?)
}

/// A service's configuration. Implementors say what is theirs (version,
/// prefix, where the data directory is, their own checks); loading and the
/// shared checks are written once, here.
pub trait ServiceConfig: DeserializeOwned {
    /// The configuration format this build reads; a file for another is refused.
    const VERSION: u32;
    /// Prefix of the environment overrides, e.g. `EDGE_NODE__`.
    const ENV_PREFIX: &'static str;
    /// The key of the data directory in messages, e.g. `node.data_dir`.
    const DATA_DIR_KEY: &'static str = "data_dir";

    /// The `version` the file declares.
    fn version(&self) -> u32;
    /// Where the service keeps its state, if it keeps any.
    fn data_dir(&self) -> Option<&Path>;
    fn log(&self) -> &LogConfig;
    /// The service's own checks, run after the shared ones.
    fn validate(&self) -> Result<(), ConfigError>;
    /// One line for `check-config`: what this configuration runs.
    fn summary(&self) -> String;

    /// Reads `path`, applies environment overrides, and validates.
    fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::parse(Source::File(path))
    }

    /// Parses TOML text with environment overrides, and validates.
    fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Self::parse(Source::Text(text))
    }

    fn parse(source: Source<'_>) -> Result<Self, ConfigError> {
        let config: Self = extract(source, Self::ENV_PREFIX)?;
        if config.version() != Self::VERSION {
            return Err(ConfigError::invalid(format!(
                "version is {}, this build reads version {}",
                config.version(),
                Self::VERSION
            )));
        }
        if let Some(dir) = config.data_dir().filter(|dir| !dir.is_absolute()) {
            return Err(ConfigError::invalid(format!(
                "{} must be an absolute path, got {}",
                Self::DATA_DIR_KEY,
                dir.display()
            )));
        }
        config.log().validate().map_err(|e| ConfigError::invalid(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Example {
        version: u32,
        data_dir: PathBuf,
        #[serde(default)]
        log: LogConfig,
        #[serde(default)]
        workers: usize,
    }

    impl ServiceConfig for Example {
        const VERSION: u32 = 2;
        const ENV_PREFIX: &'static str = "SERVICE_KIT_EXAMPLE__";

        fn version(&self) -> u32 {
            self.version
        }
        fn data_dir(&self) -> Option<&Path> {
            Some(&self.data_dir)
        }
        fn log(&self) -> &LogConfig {
            &self.log
        }
        fn validate(&self) -> Result<(), ConfigError> {
            match self.workers {
                0 => Err(ConfigError::invalid("workers must be positive")),
                _ => Ok(()),
            }
        }
        fn summary(&self) -> String {
            format!("{} workers", self.workers)
        }
    }

    #[test]
    fn the_shared_checks_come_before_the_services_own() {
        let ok = "version = 2\ndata_dir = \"/x\"\nworkers = 1\n";
        assert_eq!(Example::from_toml(ok).unwrap().summary(), "1 workers");
        let cases = [
            (ok.replace("version = 2", "version = 1"), "version is 1, this build reads version 2"),
            (ok.replace("\"/x\"", "\"x\""), "data_dir must be an absolute path, got x"),
            (format!("{ok}[log]\nfilter = \"[\"\n"), "log.filter"),
            (ok.replace("workers = 1", "workers = 0"), "workers must be positive"),
            (format!("{ok}colour = 1\n"), "colour"),
        ];
        for (text, expected) in cases {
            let err = Example::from_toml(&text).unwrap_err().to_string();
            assert!(err.contains(expected), "{expected:?} not in {err:?}");
        }
    }
}
