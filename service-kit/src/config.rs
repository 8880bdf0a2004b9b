//! Loading a service's configuration: a TOML file (or text), then
//! environment overrides under a prefix with `__` between levels. The
//! service's types reject unknown fields and validate the whole.

use std::path::Path;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration: {0}")]
    Load(#[from] Box<figment::Error>),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Where the configuration text comes from.
#[derive(Debug, Clone, Copy)]
pub enum Source<'a> {
    File(&'a Path),
    Text(&'a str),
}

/// Reads `source`, applies `PREFIX` environment overrides, and deserializes.
pub fn extract<T: DeserializeOwned>(source: Source<'_>, env_prefix: &str) -> Result<T, ConfigError> {
    let figment = match source {
        Source::File(path) => Figment::new().merge(Toml::file_exact(path)),
        Source::Text(text) => Figment::new().merge(Toml::string(text)),
    };
    Ok(figment.merge(Env::prefixed(env_prefix).split("__")).extract().map_err(Box::new)?)
}
