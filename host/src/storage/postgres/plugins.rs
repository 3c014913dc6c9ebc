//! Plugins on PostgreSQL: component bytes in `bytea`, so every host can run
//! every version. Writes to plugins take one transaction-scoped advisory
//! lock: uploads on two hosts at once cannot both pass a quota, or both
//! become the first (active) version.

use async_trait::async_trait;
use deadpool_postgres::GenericClient;

use super::{PgStore, Tx, WriteScope, execute, query, query_one, query_opt};
use crate::model::event::{
    PluginActivated, PluginGrantsChanged, PluginResourcesChanged, PluginUploaded,
};
use crate::model::{EventBody, NewEvent, PluginGrants, PluginResources};
use crate::storage::{
    ActivateOutcome, DeleteVersionOutcome, GrantOutcome, NewPluginVersion, PluginRecord,
    PluginStore, PutOutcome, Result, VersionRecord, plugins::decode_grants,
};

/// The advisory lock plugin writes hold.
const PLUGINS_LOCK: i64 = 0x6a6f_6268_6f73_7402;

async fn lock_plugins(tx: &Tx<'_>) -> Result<()> {
    execute(tx, "SELECT pg_advisory_xact_lock($1)", &[&PLUGINS_LOCK]).await?;
    Ok(())
}

/// The plugin's active version: `None` if there is no such plugin.
async fn active_version(db: &impl GenericClient, name: &str) -> Result<Option<Option<String>>> {
    let row = query_opt(
        db,
        "SELECT active_version FROM plugins WHERE name = $1",
        &[&name],
    )
    .await?;
    Ok(row.map(|row| row.get(0)))
}

async fn put(
    tx: &Tx<'_>,
    scope: &mut WriteScope,
    new: &NewPluginVersion,
    now: i64,
) -> Result<PutOutcome> {
    lock_plugins(tx).await?;
    let existing = query_opt(
        tx,
        "SELECT content_hash FROM plugin_versions WHERE plugin = $1 AND version = $2",
        &[&new.name, &new.version],
    )
    .await?;
    match existing.map(|row| row.get::<_, String>(0)) {
        Some(hash) if hash == new.content_hash => return Ok(PutOutcome::Unchanged),
        Some(existing_hash) => return Ok(PutOutcome::Conflict { existing_hash }),
        None => {}
    }
    let totals = query_one(
        tx,
        "SELECT COUNT(*), COALESCE(SUM(size), 0)::bigint FROM plugin_versions",
        &[],
    )
    .await?;
    let (versions, bytes): (i64, i64) = (totals.get(0), totals.get(1));
    if let Some(refused) = new.over_quota(versions as u64, bytes as u64) {
        return Ok(refused);
    }
    execute(
        tx,
        "INSERT INTO plugins (name, active_version, created_at) VALUES ($1, NULL, $2)
         ON CONFLICT (name) DO NOTHING",
        &[&new.name, &now],
    )
    .await?;
    execute(
        tx,
        "INSERT INTO plugin_versions (plugin, version, content_hash, size, description, component, uploaded_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        &[
            &new.name,
            &new.version,
            &new.content_hash,
            &(new.component.len() as i64),
            &new.description,
            &new.component,
            &now,
        ],
    )
    .await?;
    let uploaded = EventBody::PluginUploaded(PluginUploaded {
        plugin: new.name.clone(),
        version: new.version.clone(),
        content_hash: new.content_hash.clone(),
        size: new.component.len(),
    });
    scope.emit(NewEvent::global(uploaded), now);
    let activated = active_version(tx, &new.name).await?.flatten().is_none();
    if activated {
        set_active(tx, scope, &new.name, &new.version, None, now).await?;
    }
    Ok(PutOutcome::Created { activated })
}

async fn set_active(
    tx: &Tx<'_>,
    scope: &mut WriteScope,
    name: &str,
    version: &str,
    previous: Option<String>,
    now: i64,
) -> Result<()> {
    execute(
        tx,
        "UPDATE plugins SET active_version = $2 WHERE name = $1",
        &[&name, &version],
    )
    .await?;
    let activated = EventBody::PluginActivated(PluginActivated {
        plugin: name.to_owned(),
        version: version.to_owned(),
        previous,
    });
    scope.emit(NewEvent::global(activated), now);
    Ok(())
}

async fn activate(
    tx: &Tx<'_>,
    scope: &mut WriteScope,
    name: &str,
    version: &str,
    now: i64,
) -> Result<ActivateOutcome> {
    lock_plugins(tx).await?;
    let exists = query_opt(
        tx,
        "SELECT 1 FROM plugin_versions WHERE plugin = $1 AND version = $2",
        &[&name, &version],
    )
    .await?
    .is_some();
    if !exists {
        return Ok(ActivateOutcome::NotFound);
    }
    let previous = active_version(tx, name).await?.flatten();
    if previous.as_deref() == Some(version) {
        return Ok(ActivateOutcome::AlreadyActive);
    }
    set_active(tx, scope, name, version, previous.clone(), now).await?;
    Ok(ActivateOutcome::Activated { previous })
}

async fn delete_version(tx: &Tx<'_>, name: &str, version: &str) -> Result<DeleteVersionOutcome> {
    lock_plugins(tx).await?;
    let Some(active) = active_version(tx, name).await? else {
        return Ok(DeleteVersionOutcome::NotFound);
    };
    let versions: i64 = query_one(
        tx,
        "SELECT COUNT(*) FROM plugin_versions WHERE plugin = $1",
        &[&name],
    )
    .await?
    .get(0);
    let jobs: i64 = query_one(
        tx,
        "SELECT COUNT(DISTINCT p.job_id) FROM phases p JOIN jobs j ON j.id = p.job_id
         WHERE p.plugin = $1 AND p.version = $2 AND j.status IN ('pending', 'running', 'waiting')",
        &[&name, &version],
    )
    .await?
    .get(0);
    if jobs > 0 {
        return Ok(DeleteVersionOutcome::InUse { jobs: jobs as u64 });
    }
    if active.as_deref() == Some(version) && versions > 1 {
        return Ok(DeleteVersionOutcome::Active);
    }
    let deleted = query_opt(
        tx,
        "DELETE FROM plugin_versions WHERE plugin = $1 AND version = $2 RETURNING content_hash",
        &[&name, &version],
    )
    .await?;
    let Some(hash) = deleted.map(|row| row.get::<_, String>(0)) else {
        return Ok(DeleteVersionOutcome::NotFound);
    };
    if versions == 1 {
        execute(tx, "DELETE FROM plugins WHERE name = $1", &[&name]).await?;
        execute(tx, "DELETE FROM plugin_grants WHERE plugin = $1", &[&name]).await?;
    }
    let still_used = query_opt(
        tx,
        "SELECT 1 FROM plugin_versions WHERE content_hash = $1 LIMIT 1",
        &[&hash],
    )
    .await?
    .is_some();
    if still_used {
        return Ok(DeleteVersionOutcome::Deleted {
            unused_content: None,
        });
    }
    execute(
        tx,
        "DELETE FROM artifacts WHERE content_hash = $1",
        &[&hash],
    )
    .await?;
    Ok(DeleteVersionOutcome::Deleted {
        unused_content: Some(hash),
    })
}

async fn set_grants(
    tx: &Tx<'_>,
    scope: &mut WriteScope,
    name: &str,
    grants: &PluginGrants,
    now: i64,
) -> Result<GrantOutcome> {
    lock_plugins(tx).await?;
    if active_version(tx, name).await?.is_none() {
        return Ok(GrantOutcome::PluginNotFound);
    }
    let unknown = query_opt(
        tx,
        "SELECT v FROM unnest($2::text[]) v
         WHERE NOT EXISTS (SELECT 1 FROM plugin_versions WHERE plugin = $1 AND version = v)
         LIMIT 1",
        &[&name, &grants.versions],
    )
    .await?;
    if let Some(row) = unknown {
        return Ok(GrantOutcome::UnknownVersion(row.get(0)));
    }
    let json = serde_json::to_string(grants).expect("grants serialize");
    execute(
        tx,
        "INSERT INTO plugin_grants (plugin, grants, updated_at) VALUES ($1, $2, $3)
         ON CONFLICT (plugin) DO UPDATE SET grants = EXCLUDED.grants, updated_at = EXCLUDED.updated_at",
        &[&name, &json, &now],
    )
    .await?;
    let changed = EventBody::PluginGrantsChanged(PluginGrantsChanged::new(name, grants));
    scope.emit(NewEvent::global(changed), now);
    Ok(GrantOutcome::Set)
}

async fn set_resources(
    tx: &Tx<'_>,
    scope: &mut WriteScope,
    name: &str,
    resources: PluginResources,
    now: i64,
) -> Result<bool> {
    let updated = execute(
        tx,
        "UPDATE plugins SET memory_mb = $2, timeout_ms = $3 WHERE name = $1",
        &[
            &name,
            &resources.memory_mb.map(|mb| mb as i64),
            &resources.timeout_ms.map(|ms| ms as i64),
        ],
    )
    .await?;
    if updated == 0 {
        return Ok(false);
    }
    super::plugin_limits::set_limits(tx, scope, name, &resources).await?;
    let changed = EventBody::PluginResourcesChanged(PluginResourcesChanged {
        plugin: name.to_owned(),
        resources,
    });
    scope.emit(NewEvent::global(changed), now);
    Ok(true)
}

async fn grants_of(db: &impl GenericClient, name: &str) -> Result<Option<PluginGrants>> {
    let row = query_opt(
        db,
        "SELECT grants FROM plugin_grants WHERE plugin = $1",
        &[&name],
    )
    .await?;
    row.map(|row| decode_grants(&row.get::<_, String>(0)))
        .transpose()
}

async fn records(db: &impl GenericClient, name: Option<&str>) -> Result<Vec<PluginRecord>> {
    let rows = query(
        db,
        "SELECT p.name, p.active_version, v.version, v.content_hash, v.size, v.description, v.uploaded_at,
                g.grants, p.memory_mb, p.timeout_ms, l.max_running, l.per_second
         FROM plugins p JOIN plugin_versions v ON v.plugin = p.name
         LEFT JOIN plugin_grants g ON g.plugin = p.name
         LEFT JOIN plugin_limits l ON l.plugin = p.name
         WHERE $1::text IS NULL OR p.name = $1
         ORDER BY p.name, v.uploaded_at, v.version",
        &[&name],
    )
    .await?;
    let mut plugins: Vec<PluginRecord> = Vec::new();
    for row in rows {
        let name: String = row.get(0);
        let version = VersionRecord {
            version: row.get(2),
            content_hash: row.get(3),
            size: row.get::<_, i64>(4) as u64,
            description: row.get(5),
            uploaded_at: row.get(6),
        };
        match plugins.last_mut() {
            Some(last) if last.name == name => last.versions.push(version),
            _ => plugins.push(PluginRecord {
                name,
                active_version: row.get(1),
                versions: vec![version],
                grants: row
                    .get::<_, Option<String>>(7)
                    .map(|json| decode_grants(&json))
                    .transpose()?,
                resources: PluginResources {
                    memory_mb: row.get::<_, Option<i64>>(8).map(|mb| mb as u64),
                    timeout_ms: row.get::<_, Option<i64>>(9).map(|ms| ms as u64),
                    max_running: row.get::<_, Option<i32>>(10).map(|n| n as u32),
                    per_second: row.get(11),
                },
            }),
        }
    }
    Ok(plugins)
}

impl PgStore {
    /// Each host keeps its own artifact cache, on its own disk: the digest
    /// on record is this host's (compiling one component on two hosts need
    /// not give the same bytes).
    fn artifact_key(&self, engine: &str) -> String {
        format!("{engine}@{}", self.host)
    }
}

#[async_trait]
impl PluginStore for PgStore {
    async fn put_plugin_version(&self, new: NewPluginVersion, now: i64) -> Result<PutOutcome> {
        self.write(move |tx, scope| Box::pin(async move { put(tx, scope, &new, now).await }))
            .await
    }

    async fn activate_plugin_version(
        &self,
        name: &str,
        version: &str,
        now: i64,
    ) -> Result<ActivateOutcome> {
        let (name, version) = (name.to_owned(), version.to_owned());
        self.write(move |tx, scope| {
            Box::pin(async move { activate(tx, scope, &name, &version, now).await })
        })
        .await
    }

    async fn delete_plugin_version(
        &self,
        name: &str,
        version: &str,
    ) -> Result<DeleteVersionOutcome> {
        let (name, version) = (name.to_owned(), version.to_owned());
        self.write(move |tx, _| Box::pin(async move { delete_version(tx, &name, &version).await }))
            .await
    }

    async fn plugins(&self) -> Result<Vec<PluginRecord>> {
        let client = self.client().await?;
        records(&client, None).await
    }

    async fn plugin(&self, name: &str) -> Result<Option<PluginRecord>> {
        let client = self.client().await?;
        Ok(records(&client, Some(name)).await?.pop())
    }

    async fn artifact_digest(&self, content_hash: &str, engine: &str) -> Result<Option<String>> {
        let client = self.client().await?;
        let row = query_opt(
            &client,
            "SELECT digest FROM artifacts WHERE content_hash = $1 AND engine = $2",
            &[&content_hash, &self.artifact_key(engine)],
        )
        .await?;
        Ok(row.map(|row| row.get(0)))
    }

    async fn record_artifact(&self, content_hash: &str, engine: &str, digest: &str) -> Result<()> {
        let client = self.client().await?;
        execute(
            &client,
            "INSERT INTO artifacts (content_hash, engine, digest) VALUES ($1, $2, $3)
             ON CONFLICT (content_hash, engine) DO UPDATE SET digest = EXCLUDED.digest",
            &[&content_hash, &self.artifact_key(engine), &digest],
        )
        .await?;
        Ok(())
    }

    async fn set_plugin_grants(
        &self,
        name: &str,
        grants: &PluginGrants,
        now: i64,
    ) -> Result<GrantOutcome> {
        let (name, grants) = (name.to_owned(), grants.clone());
        self.write(move |tx, scope| {
            Box::pin(async move { set_grants(tx, scope, &name, &grants, now).await })
        })
        .await
    }

    async fn set_plugin_resources(
        &self,
        name: &str,
        resources: PluginResources,
        now: i64,
    ) -> Result<bool> {
        let name = name.to_owned();
        self.write(move |tx, scope| {
            Box::pin(async move { set_resources(tx, scope, &name, resources, now).await })
        })
        .await
    }

    async fn plugin_grants(&self, name: &str) -> Result<Option<PluginGrants>> {
        let client = self.client().await?;
        grants_of(&client, name).await
    }

    async fn plugin_component(&self, name: &str, version: &str) -> Result<Option<Vec<u8>>> {
        let client = self.client().await?;
        let row = query_opt(
            &client,
            "SELECT component FROM plugin_versions WHERE plugin = $1 AND version = $2",
            &[&name, &version],
        )
        .await?;
        Ok(row.map(|row| row.get(0)))
    }
}
