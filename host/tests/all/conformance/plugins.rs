//! Plugin grants and resources: operator data stored beside the plugin.

use std::collections::BTreeMap;

use jobhost::model::event::{PluginGrantsChanged, PluginResourcesChanged};
use jobhost::model::{EventBody, EventKind, PluginGrants, PluginResources};
use jobhost::storage::{EventFilter, GrantOutcome};

use super::{fresh, with_echo};
use crate::fixture::Backend;

/// Grants are set whole (a new set replaces the old, it does not merge),
/// only for stored versions, each change logged by names; they go with
/// the plugin's last version.
pub async fn grants_replace_the_old_ones_and_go_with_the_plugin(backend: Backend) {
    let (store, _dir) = fresh(backend).await;
    with_echo(&store).await;
    assert_eq!(store.plugin_grants("echo").await.unwrap(), None);
    let first = PluginGrants {
        versions: vec!["1.0.0".into()],
        config: BTreeMap::from([("region".into(), "eu".into())]),
        secrets: vec!["token".into()],
        http: vec!["https://*.example.org".into()],
    };
    let outcome = store.set_plugin_grants("nope", &first, 1).await.unwrap();
    assert_eq!(outcome, GrantOutcome::PluginNotFound);
    let unknown = PluginGrants {
        versions: vec!["1.0.0".into(), "3.0.0".into()],
        ..first.clone()
    };
    let outcome = store.set_plugin_grants("echo", &unknown, 1).await.unwrap();
    assert_eq!(outcome, GrantOutcome::UnknownVersion("3.0.0".into()));
    assert_eq!(
        store.plugin_grants("echo").await.unwrap(),
        None,
        "nothing stored"
    );

    let outcome = store.set_plugin_grants("echo", &first, 2).await.unwrap();
    assert_eq!(outcome, GrantOutcome::Set);
    assert_eq!(
        store.plugin_grants("echo").await.unwrap(),
        Some(first.clone())
    );
    let record = store.plugin("echo").await.unwrap().unwrap();
    assert_eq!(record.grants, Some(first.clone()));
    assert_eq!(
        store.plugins().await.unwrap()[0].grants,
        Some(first.clone())
    );

    let second = PluginGrants {
        versions: vec!["1.0.0".into(), "2.0.0".into()],
        ..Default::default()
    };
    store.set_plugin_grants("echo", &second, 3).await.unwrap();
    assert_eq!(
        store.plugin_grants("echo").await.unwrap(),
        Some(second.clone())
    );

    let filter = EventFilter {
        job_id: None,
        kinds: vec![EventKind::PluginGrantsChanged],
    };
    let logged: Vec<EventBody> = store
        .events_after(0, filter, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|event| event.body)
        .collect();
    let expected: Vec<EventBody> = [&first, &second]
        .into_iter()
        .map(|grants| EventBody::PluginGrantsChanged(PluginGrantsChanged::new("echo", grants)))
        .collect();
    assert_eq!(logged, expected);

    store.delete_plugin_version("echo", "2.0.0").await.unwrap();
    assert_eq!(store.plugin_grants("echo").await.unwrap(), Some(second));
    store.delete_plugin_version("echo", "1.0.0").await.unwrap();
    assert_eq!(store.plugin_grants("echo").await.unwrap(), None);
    with_echo(&store).await;
    assert_eq!(
        store.plugin_grants("echo").await.unwrap(),
        None,
        "a new plugin of the same name starts without grants"
    );
}

/// A plugin's resources are stored on it, read back with it and logged.
pub async fn resources_are_set_on_the_plugin_and_logged(backend: Backend) {
    let (store, _dir) = fresh(backend).await;
    with_echo(&store).await;
    let resources = PluginResources {
        memory_mb: Some(1024),
        max_running: Some(3),
        per_second: Some(2.5),
        ..PluginResources::default()
    };
    assert!(
        !store
            .set_plugin_resources("nope", resources, 1)
            .await
            .unwrap()
    );
    let record = store.plugin("echo").await.unwrap().unwrap();
    assert_eq!(record.resources, PluginResources::default());
    assert!(
        store
            .set_plugin_resources("echo", resources, 2)
            .await
            .unwrap()
    );
    let record = store.plugin("echo").await.unwrap().unwrap();
    assert_eq!(record.resources, resources);
    let filter = EventFilter {
        job_id: None,
        kinds: vec![EventKind::PluginResourcesChanged],
    };
    let logged = store.events_after(0, filter, 10).await.unwrap();
    let expected = EventBody::PluginResourcesChanged(PluginResourcesChanged {
        plugin: "echo".into(),
        resources,
    });
    assert_eq!(logged.len(), 1);
    assert_eq!(logged[0].body, expected);
}
