//! roamd's error type. Each variant says which part failed, so a message that reaches
//! the user (through the control API or a migration result) names what was wrong.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    #[error("state store: {0}")]
    State(String),
    #[error("{what} '{name}' not found")]
    NotFound { what: &'static str, name: String },
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("disk: {0}")]
    Disk(String),
    #[error("vm: {0}")]
    Vm(String),
    #[error("peer '{peer}': {detail}")]
    Peer { peer: String, detail: String },
    #[error("{0}")]
    Migration(String),
}

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub fn not_found(what: &'static str, name: impl Into<String>) -> Error {
        Error::NotFound {
            what,
            name: name.into(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
