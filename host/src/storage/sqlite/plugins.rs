//! Plugins and their versions: the component bytes, content hash and which
//! version is active.

use rusqlite::{Connection, OptionalExtension, params};

use async_trait::async_trait;

use super::SqliteStore;
use super::writer::EventLog;
use crate::model::event::{
    PluginActivated, PluginGrantsChanged, PluginResourcesChanged, PluginUploaded,
};
use crate::model::{EventBody, NewEvent, PluginGrants, PluginResources};
use crate::storage::{
    ActivateOutcome, DeleteVersionOutcome, GrantOutcome, NewPluginVersion, PluginRecord,
    PluginStore, PutOutcome, Result, VersionRecord, plugins::decode_grants,
};

fn active_version(conn: &Connection, name: &str) -> rusqlite::Result<Option<Option<String>>> {
    conn.prepare_cached("SELECT active_version FROM plugins WHERE name = ?1")?
        .query_row([name], |row| row.get(0))
        .optional()
}

fn put(
    conn: &Connection,
    log: &mut EventLog,
    new: &NewPluginVersion,
    now: i64,
) -> Result<PutOutcome> {
    let existing: Option<String> = conn
        .prepare_cached(
            "SELECT content_hash FROM plugin_versions WHERE plugin = ?1 AND version = ?2",
        )?
        .query_row(params![new.name, new.version], |row| row.get(0))
        .optional()?;
    match existing {
        Some(hash) if hash == new.content_hash => return Ok(PutOutcome::Unchanged),
        Some(existing_hash) => return Ok(PutOutcome::Conflict { existing_hash }),
        None => {}
    }
    let (versions, bytes): (i64, i64) = conn.query_row(
        "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM plugin_versions",
        [],
        |row| Ok((row.get(0)?, row.get(1)?)),
    )?;
    if let Some(refused) = new.over_quota(versions as u64, bytes as u64) {
        return Ok(refused);
    }
    conn.execute(
        "INSERT OR IGNORE INTO plugins (name, active_version, created_at) VALUES (?1, NULL, ?2)",
        params![new.name, now],
    )?;
    conn.execute(
        "INSERT INTO plugin_versions (plugin, version, content_hash, size, description, component, uploaded_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![new.name, new.version, new.content_hash, new.component.len() as i64, new.description, new.component, now],
    )?;
    let uploaded = EventBody::PluginUploaded(PluginUploaded {
        plugin: new.name.clone(),
        version: new.version.clone(),
        content_hash: new.content_hash.clone(),
        size: new.component.len(),
    });
    log.emit(conn, NewEvent::global(uploaded), now)?;
    let activated = active_version(conn, &new.name)?.flatten().is_none();
    if activated {
        conn.execute(
            "UPDATE plugins SET active_version = ?2 WHERE name = ?1",
            params![new.name, new.version],
        )?;
        let activated = EventBody::PluginActivated(PluginActivated {
            plugin: new.name.clone(),
            version: new.version.clone(),
            previous: None,
        });
        log.emit(conn, NewEvent::global(activated), now)?;
    }
    Ok(PutOutcome::Created { activated })
}

fn activate(
    conn: &Connection,
    log: &mut EventLog,
    name: &str,
    version: &str,
    now: i64,
) -> Result<ActivateOutcome> {
    let exists: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM plugin_versions WHERE plugin = ?1 AND version = ?2)",
        params![name, version],
        |row| row.get(0),
    )?;
    if !exists {
        return Ok(ActivateOutcome::NotFound);
    }
    let previous = active_version(conn, name)?.flatten();
    if previous.as_deref() == Some(version) {
        return Ok(ActivateOutcome::AlreadyActive);
    }
    conn.execute(
        "UPDATE plugins SET active_version = ?2 WHERE name = ?1",
        params![name, version],
    )?;
    let activated = EventBody::PluginActivated(PluginActivated {
        plugin: name.to_owned(),
        version: version.to_owned(),
        previous: previous.clone(),
    });
    log.emit(conn, NewEvent::global(activated), now)?;
    Ok(ActivateOutcome::Activated { previous })
}

fn delete_version(conn: &Connection, name: &str, version: &str) -> Result<DeleteVersionOutcome> {
    let Some(active) = active_version(conn, name)? else {
        return Ok(DeleteVersionOutcome::NotFound);
    };
    let versions: i64 = conn.query_row(
        "SELECT COUNT(*) FROM plugin_versions WHERE plugin = ?1",
        [name],
        |row| row.get(0),
    )?;
    let jobs: i64 = conn.query_row(
        "SELECT COUNT(DISTINCT p.job_id) FROM phases p JOIN jobs j ON j.id = p.job_id
         WHERE p.plugin = ?1 AND p.version = ?2 AND j.status IN ('pending', 'running', 'waiting')",
        params![name, version],
        |row| row.get(0),
    )?;
    if jobs > 0 {
        return Ok(DeleteVersionOutcome::InUse { jobs: jobs as u64 });
    }
    if active.as_deref() == Some(version) && versions > 1 {
        return Ok(DeleteVersionOutcome::Active);
    }
    let deleted: Option<String> = conn
        .query_row(
            "DELETE FROM plugin_versions WHERE plugin = ?1 AND version = ?2 RETURNING content_hash",
            params![name, version],
            |row| row.get(0),
        )
        .optional()?;
    let Some(hash) = deleted else {
        return Ok(DeleteVersionOutcome::NotFound);
    };
    if versions == 1 {
        conn.execute("DELETE FROM plugins WHERE name = ?1", [name])?;
        conn.execute("DELETE FROM plugin_grants WHERE plugin = ?1", [name])?;
    }
    let still_used: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM plugin_versions WHERE content_hash = ?1)",
        [&hash],
        |row| row.get(0),
    )?;
    if still_used {
        return Ok(DeleteVersionOutcome::Deleted {
            unused_content: None,
        });
    }
    conn.execute("DELETE FROM artifacts WHERE content_hash = ?1", [&hash])?;
    Ok(DeleteVersionOutcome::Deleted {
        unused_content: Some(hash),
    })
}

fn set_grants(
    conn: &Connection,
    log: &mut EventLog,
    name: &str,
    grants: &PluginGrants,
    now: i64,
) -> Result<GrantOutcome> {
    if active_version(conn, name)?.is_none() {
        return Ok(GrantOutcome::PluginNotFound);
    }
    let mut exists = conn.prepare_cached(
        "SELECT EXISTS (SELECT 1 FROM plugin_versions WHERE plugin = ?1 AND version = ?2)",
    )?;
    for version in &grants.versions {
        if !exists.query_row(params![name, version], |row| row.get::<_, bool>(0))? {
            return Ok(GrantOutcome::UnknownVersion(version.clone()));
        }
    }
    let json = serde_json::to_string(grants).expect("grants serialize");
    conn.execute(
        "INSERT INTO plugin_grants (plugin, grants, updated_at) VALUES (?1, ?2, ?3)
         ON CONFLICT (plugin) DO UPDATE SET grants = excluded.grants, updated_at = excluded.updated_at",
        params![name, json, now],
    )?;
    let changed = EventBody::PluginGrantsChanged(PluginGrantsChanged::new(name, grants));
    log.emit(conn, NewEvent::global(changed), now)?;
    Ok(GrantOutcome::Set)
}

fn set_resources(
    conn: &Connection,
    log: &mut EventLog,
    name: &str,
    resources: PluginResources,
    now: i64,
) -> Result<bool> {
    let updated = conn.execute(
        "UPDATE plugins SET memory_mb = ?2, timeout_ms = ?3 WHERE name = ?1",
        params![
            name,
            resources.memory_mb.map(|mb| mb as i64),
            resources.timeout_ms.map(|ms| ms as i64)
        ],
    )?;
    if updated == 0 {
        return Ok(false);
    }
    super::plugin_limits::set_limits(conn, name, &resources)?;
    let changed = EventBody::PluginResourcesChanged(PluginResourcesChanged {
        plugin: name.to_owned(),
        resources,
    });
    log.emit(conn, NewEvent::global(changed), now)?;
    Ok(true)
}

fn grants_of(conn: &Connection, name: &str) -> Result<Option<PluginGrants>> {
    let json: Option<String> = conn
        .prepare_cached("SELECT grants FROM plugin_grants WHERE plugin = ?1")?
        .query_row([name], |row| row.get(0))
        .optional()?;
    json.map(|json| decode_grants(&json)).transpose()
}

fn records(conn: &Connection, name: Option<&str>) -> Result<Vec<PluginRecord>> {
    let mut stmt = conn.prepare_cached(
        "SELECT p.name, p.active_version, v.version, v.content_hash, v.size, v.description, v.uploaded_at,
                p.memory_mb, p.timeout_ms, g.grants, l.max_running, l.per_second
         FROM plugins p JOIN plugin_versions v ON v.plugin = p.name
         LEFT JOIN plugin_grants g ON g.plugin = p.name
         LEFT JOIN plugin_limits l ON l.plugin = p.name
         WHERE ?1 IS NULL OR p.name = ?1
         ORDER BY p.name, v.uploaded_at, v.version",
    )?;
    let mut plugins: Vec<PluginRecord> = Vec::new();
    let rows = stmt.query_map([name], |row| {
        Ok((
            row.get::<_, String>(0)?,
            row.get::<_, Option<String>>(1)?,
            VersionRecord {
                version: row.get(2)?,
                content_hash: row.get(3)?,
                size: row.get::<_, i64>(4)? as u64,
                description: row.get(5)?,
                uploaded_at: row.get(6)?,
            },
            PluginResources {
                memory_mb: row.get::<_, Option<i64>>(7)?.map(|mb| mb as u64),
                timeout_ms: row.get::<_, Option<i64>>(8)?.map(|ms| ms as u64),
                max_running: row.get(10)?,
                per_second: row.get(11)?,
            },
            row.get::<_, Option<String>>(9)?,
        ))
    })?;
    for row in rows {
        let (name, active_version, version, resources, grants) = row?;
        match plugins.last_mut() {
            Some(last) if last.name == name => last.versions.push(version),
            _ => plugins.push(PluginRecord {
                name,
                active_version,
                versions: vec![version],
                grants: grants.map(|json| decode_grants(&json)).transpose()?,
                resources,
            }),
        }
    }
    Ok(plugins)
}

#[async_trait]
impl PluginStore for SqliteStore {
    async fn put_plugin_version(&self, new: NewPluginVersion, now: i64) -> Result<PutOutcome> {
        self.write(move |conn, log| put(conn, log, &new, now)).await
    }

    async fn activate_plugin_version(
        &self,
        name: &str,
        version: &str,
        now: i64,
    ) -> Result<ActivateOutcome> {
        let (name, version) = (name.to_owned(), version.to_owned());
        self.write(move |conn, log| activate(conn, log, &name, &version, now))
            .await
    }

    async fn delete_plugin_version(
        &self,
        name: &str,
        version: &str,
    ) -> Result<DeleteVersionOutcome> {
        let (name, version) = (name.to_owned(), version.to_owned());
        self.write(move |conn, _| delete_version(conn, &name, &version))
            .await
    }

    async fn plugins(&self) -> Result<Vec<PluginRecord>> {
        self.read(|conn| records(conn, None)).await
    }

    async fn plugin(&self, name: &str) -> Result<Option<PluginRecord>> {
        let name = name.to_owned();
        self.read(move |conn| Ok(records(conn, Some(&name))?.pop()))
            .await
    }

    async fn artifact_digest(&self, content_hash: &str, engine: &str) -> Result<Option<String>> {
        let (hash, engine) = (content_hash.to_owned(), engine.to_owned());
        self.read(move |conn| {
            Ok(conn
                .prepare_cached(
                    "SELECT digest FROM artifacts WHERE content_hash = ?1 AND engine = ?2",
                )?
                .query_row(params![hash, engine], |row| row.get(0))
                .optional()?)
        })
        .await
    }

    async fn record_artifact(&self, content_hash: &str, engine: &str, digest: &str) -> Result<()> {
        let (hash, engine, digest) = (
            content_hash.to_owned(),
            engine.to_owned(),
            digest.to_owned(),
        );
        self.write(move |conn, _| {
            conn.prepare_cached(
                "INSERT INTO artifacts (content_hash, engine, digest) VALUES (?1, ?2, ?3)
                 ON CONFLICT (content_hash, engine) DO UPDATE SET digest = excluded.digest",
            )?
            .execute(params![hash, engine, digest])?;
            Ok(())
        })
        .await
    }

    async fn set_plugin_grants(
        &self,
        name: &str,
        grants: &PluginGrants,
        now: i64,
    ) -> Result<GrantOutcome> {
        let (name, grants) = (name.to_owned(), grants.clone());
        self.write(move |conn, log| set_grants(conn, log, &name, &grants, now))
            .await
    }

    async fn set_plugin_resources(
        &self,
        name: &str,
        resources: PluginResources,
        now: i64,
    ) -> Result<bool> {
        let name = name.to_owned();
        self.write(move |conn, log| set_resources(conn, log, &name, resources, now))
            .await
    }

    async fn plugin_grants(&self, name: &str) -> Result<Option<PluginGrants>> {
        let name = name.to_owned();
        self.read(move |conn| grants_of(conn, &name)).await
    }

    async fn plugin_component(&self, name: &str, version: &str) -> Result<Option<Vec<u8>>> {
        let (name, version) = (name.to_owned(), version.to_owned());
        self.read(move |conn| {
            Ok(conn
                .prepare_cached(
                    "SELECT component FROM plugin_versions WHERE plugin = ?1 AND version = ?2",
                )?
                .query_row(params![name, version], |row| row.get(0))
                .optional()?)
        })
        .await
    }
}
