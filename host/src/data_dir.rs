//! The data directory of `jobhost serve`: private to the server's user, and
//! used by one server at a time.
//!
//! Files created in it are readable by their owner only (the process's
//! umask is narrowed to 077, which also covers SQLite's WAL and the
//! compiled-artifact cache), and an exclusive lock on `<data-dir>/lock`
//! makes a second `serve` on the same directory exit at once: two servers
//! would each "recover" the other's running jobs and run them twice.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::Path;

use anyhow::Context as _;

/// Holds the data directory's lock until dropped.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
}

/// Creates `dir` (mode 0700) if needed and takes its lock, or says which
/// process holds it.
pub fn open(dir: &Path) -> anyhow::Result<DataDirLock> {
    #[cfg(unix)]
    {
        // SAFETY: umask only sets the process's file-creation mask.
        unsafe { libc::umask(0o077) };
    }
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder
        .create(dir)
        .with_context(|| format!("creating data directory {}", dir.display()))?;
    let path = dir.join("lock");
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            anyhow::bail!(
                "another jobhost (pid {}) is serving the data directory {}; stop it first or give this one its own --data-dir",
                holder.trim(),
                dir.display()
            );
        }
        Err(std::fs::TryLockError::Error(error)) => {
            return Err(error).with_context(|| format!("locking {}", path.display()));
        }
    }
    file.set_len(0)?;
    file.rewind()?;
    writeln!(file, "{}", std::process::id())?;
    Ok(DataDirLock { _file: file })
}

/// This host's identity among hosts sharing a PostgreSQL database, kept in
/// the data directory (`host-id`) so that a restart is the same host and
/// recovers its own jobs at once.
pub fn host_id(dir: &Path) -> anyhow::Result<String> {
    let path = dir.join("host-id");
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => Ok(id.trim().to_owned()),
        Ok(_) | Err(_) => {
            let id = uuid::Uuid::now_v7().to_string();
            std::fs::write(&path, &id).with_context(|| format!("writing {}", path.display()))?;
            Ok(id)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_naming_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let held = open(&data).unwrap();
        let error = open(&data).unwrap_err().to_string();
        assert!(
            error.contains(&format!("pid {}", std::process::id())),
            "{error}"
        );
        drop(held);
        open(&data).expect("free again once the first is gone");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&data).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o700);
        }
    }
}
