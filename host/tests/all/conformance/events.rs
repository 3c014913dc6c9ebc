//! The webhook outbox and the event log.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use jobhost::model::event::WebhookSettled;
use jobhost::model::webhook::WebhookBody;
use jobhost::model::{EventBody, EventKind};
use jobhost::storage::{AttemptOutcome, EventFilter, NewJob};

use super::{done, fresh, job, running, with_echo};
use crate::fixture::Backend;

/// A job that ends with a webhook adds one delivery, in the same write,
/// with the body every attempt sends; a settled delivery is logged.
pub async fn an_ending_job_with_a_webhook_adds_one_delivery(backend: Backend) {
    let (store, _dir) = fresh(backend).await;
    with_echo(&store).await;
    let hooked = NewJob {
        webhook_url: Some("http://127.0.0.1:9/hook".into()),
        webhook_secret: Some("whsec_c2VjcmV0".into()),
        ..job("job-1", 1)
    };
    let claimed = running(&store, hooked).await;
    running(&store, job("silent", 1)).await; // no webhook
    assert!(store.due_webhooks(10_000, 10).await.unwrap().is_empty());
    store
        .complete_phase(&claimed.lease, done(0, false, 3_000))
        .await
        .unwrap();
    let due = store.due_webhooks(3_000, 10).await.unwrap();
    assert_eq!(due.len(), 1);
    let delivery = &due[0];
    assert_eq!(
        (
            delivery.job_id.as_str(),
            delivery.url.as_str(),
            delivery.attempts
        ),
        ("job-1", "http://127.0.0.1:9/hook", 0)
    );
    assert_eq!(delivery.secret.as_deref(), Some("whsec_c2VjcmV0"));
    let body: WebhookBody = serde_json::from_str(&delivery.body).unwrap();
    assert_eq!(body.kind, EventKind::JobCompleted);
    assert_eq!(
        (body.data.job_id.as_str(), body.data.status.as_str()),
        ("job-1", "completed")
    );
    assert_eq!(store.next_webhook_at().await.unwrap(), Some(3_000));

    // A retry waits; a success settles it and is logged.
    let retry = AttemptOutcome::Retry {
        status: Some(503),
        error: "busy".into(),
        next_attempt_at: 4_000,
    };
    store
        .record_webhook_attempt(delivery.clone(), retry, 3_100)
        .await
        .unwrap();
    assert!(store.due_webhooks(3_999, 10).await.unwrap().is_empty());
    let again = store.due_webhooks(4_000, 10).await.unwrap().remove(0);
    assert_eq!(again.attempts, 1);
    store
        .record_webhook_attempt(again, AttemptOutcome::Delivered { status: 204 }, 4_100)
        .await
        .unwrap();
    assert!(store.due_webhooks(100_000, 10).await.unwrap().is_empty());
    assert_eq!(store.next_webhook_at().await.unwrap(), None);
    let filter = EventFilter {
        job_id: Some("job-1".into()),
        kinds: vec![EventKind::WebhookDelivered],
    };
    let logged = store.events_after(0, filter, 10).await.unwrap();
    assert_eq!(logged.len(), 1);
    assert_eq!(
        logged[0].body,
        EventBody::WebhookDelivered(WebhookSettled {
            webhook_id: delivery.id.clone(),
            url: delivery.url.clone(),
            attempts: 2,
            status: Some(204),
            error: None,
        })
    );
    let stored = store.job("job-1").await.unwrap().unwrap();
    let webhook = stored.webhook.expect("the job shows its delivery");
    assert_eq!(webhook.status, jobhost::model::DeliveryStatus::Delivered);
}

/// The log reads back in one order by cursor: a reader resuming after any
/// event gets exactly the rest, filtered by job or kind, and a commit
/// wakes readers with the newest sequence number.
pub async fn the_log_reads_back_in_order_by_cursor_and_filter(backend: Backend) {
    let (store, _dir) = fresh(backend).await;
    let woken = Arc::new(AtomicUsize::new(0));
    store.on_append({
        let woken = woken.clone();
        Arc::new(move || {
            woken.fetch_add(1, Ordering::SeqCst);
        })
    });
    with_echo(&store).await;
    let wakes = woken.load(Ordering::SeqCst);
    assert!(wakes > 0, "a commit that appended events wakes readers");
    let a = running(&store, job("a", 1)).await;
    let b = running(&store, job("b", 1)).await;
    store
        .complete_phase(&b.lease, done(0, false, 3_000))
        .await
        .unwrap();
    store
        .complete_phase(&a.lease, done(0, false, 3_100))
        .await
        .unwrap();

    let all = store
        .events_after(0, EventFilter::default(), 1000)
        .await
        .unwrap();
    assert!(
        all.windows(2).all(|w| w[0].seq < w[1].seq),
        "one increasing order"
    );
    let newest = store.last_event_seq().await.unwrap();
    assert_eq!(all.last().unwrap().seq, newest);
    assert_eq!(store.tail_log(0, 1000).await.unwrap(), all);
    // A backend's in-memory tail, where it has one, is the log's.
    if let Some(cached) = store.tail_cached(all[3].seq, 1000) {
        assert_eq!(cached, all[4..]);
    }
    // Reads append nothing and wake no one.
    let wakes = woken.load(Ordering::SeqCst);
    store.job("a").await.unwrap();
    assert_eq!(woken.load(Ordering::SeqCst), wakes);

    for (position, event) in all.iter().enumerate() {
        let rest = store
            .events_after(event.seq, EventFilter::default(), 1000)
            .await
            .unwrap();
        assert_eq!(rest, all[position + 1..], "resuming after {}", event.seq);
    }
    let page = store.tail_log(all[1].seq, 2).await.unwrap();
    assert_eq!(page, all[2..4]);

    let of_a = EventFilter {
        job_id: Some("a".into()),
        kinds: vec![],
    };
    let expected: Vec<_> = all
        .iter()
        .filter(|e| e.job_id.as_deref() == Some("a"))
        .cloned()
        .collect();
    assert_eq!(store.events_after(0, of_a, 1000).await.unwrap(), expected);
    let completions = EventFilter {
        job_id: None,
        kinds: vec![EventKind::JobCompleted],
    };
    let ended: Vec<_> = store
        .events_after(0, completions, 1000)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.job_id.unwrap())
        .collect();
    assert_eq!(ended, ["b", "a"], "in the order they committed");
}
