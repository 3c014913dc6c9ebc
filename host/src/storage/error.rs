//! Storage errors, the same for every backend: each has a class that says
//! what the caller can do about it. A guard that does not hold is not an
//! error (see [`super::Guarded`]).

/// What kind of failure a storage error is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Transient (the database was busy, a connection dropped, a
    /// serialization conflict): the same call may succeed if made again.
    Retryable,
    /// The database reached its size limit (`--max-db-mb`) or the disk is
    /// full: the write was refused whole, and nothing else was lost.
    Full,
    /// A constraint refused the write.
    Conflict,
    /// Something the call needed does not exist.
    NotFound,
    /// Stored data could not be read back, or the database is damaged.
    Corrupt,
    /// Storage was closed (shutdown).
    Closed,
    /// Anything else the backend reported.
    Other,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct StorageError {
    class: ErrorClass,
    message: String,
}

impl StorageError {
    pub fn new(class: ErrorClass, message: impl Into<String>) -> Self {
        StorageError {
            class,
            message: message.into(),
        }
    }

    pub fn corrupt(message: impl Into<String>) -> Self {
        StorageError::new(ErrorClass::Corrupt, message)
    }

    pub fn closed() -> Self {
        StorageError::new(ErrorClass::Closed, "storage is closed")
    }

    pub fn class(&self) -> ErrorClass {
        self.class
    }

    /// The database is full: see [`ErrorClass::Full`].
    pub fn is_full(&self) -> bool {
        self.class == ErrorClass::Full
    }

    pub fn is_retryable(&self) -> bool {
        self.class == ErrorClass::Retryable
    }
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;
