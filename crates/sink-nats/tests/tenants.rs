//! Events without a tenant on real servers: by default they go to the seed's token `single`;
//! with `require_tenant(true)` each one fails alone with a typed error and the next is delivered.

mod common;

use std::time::Duration;

use common::*;
use sink_core::event::{CloudEvent, MsgId};
use sink_core::subject::{SubjectError, TokenFault};
use sink_nats::{BreakerStatus, EmitError};
use sink_testkit::ServerVersion;

fn untenanted(id: &str) -> CloudEvent {
    CloudEvent::new(id, "/test/tenants", "com.example.test.v1")
        .with_data_json(serde_json::json!({ "cell": id }))
}

fn with_tenant(id: &str, tenant: &str) -> CloudEvent {
    CloudEvent::new(id, "/test/tenants", "com.example.test.v1")
        .with_data_json(serde_json::json!({ "tenantId": tenant }))
}

async fn untenanted_events_go_to_single_unless_a_tenant_is_required(version: ServerVersion) {
    let server = server(version).await;
    let default = builder(&server.url()).connect().await.expect("connect");
    default
        .emit(&untenanted("no-tenant-1"))
        .await
        .expect("an event without a tenant is delivered, as with the seed");
    default
        .emit(&with_tenant("acme-1", "acme"))
        .await
        .expect("delivered");
    // An invalid tenant is still that event's error, never replaced by the default.
    let invalid = default.emit(&with_tenant("bad-1", "a.b")).await;
    assert!(
        matches!(
            &invalid,
            Err(EmitError::Subject {
                error: SubjectError::InvalidToken {
                    reason: TokenFault::ForbiddenChar { ch: '.', .. },
                    ..
                },
                ..
            })
        ),
        "{invalid:?}"
    );
    assert!(default.close(Duration::from_secs(5)).await.complete());

    let strict = builder(&server.url())
        .require_tenant(true)
        .connect()
        .await
        .expect("connect");
    let refused = strict.emit(&untenanted("no-tenant-2")).await;
    match &refused {
        Err(e @ EmitError::Subject { event_id, error }) => {
            assert_eq!(event_id, "no-tenant-2");
            assert_eq!(error, &SubjectError::MissingTenant);
            assert!(e.to_string().contains("data.tenantId"), "{e}");
        }
        other => panic!("an event without a tenant is refused when one is required: {other:?}"),
    }
    strict
        .emit(&with_tenant("acme-2", "acme"))
        .await
        .expect("the next event is delivered");
    // The two of the first sink and this one: the refused events stored nothing.
    assert_eq!(stored_count(&server, STREAM).await, 3);
    assert_eq!(strict.health().breaker, BreakerStatus::Closed);
    assert!(strict.close(Duration::from_secs(5)).await.complete());

    let client = async_nats::connect(server.url()).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    let stored = sink_testkit::read_stream(&js, STREAM, Duration::from_secs(10))
        .await
        .expect("read back");
    let stored: Vec<(String, Option<String>)> =
        stored.into_iter().map(|m| (m.subject, m.msg_id)).collect();
    let at = |subject: &str, e: CloudEvent| {
        (
            subject.to_owned(),
            Some(MsgId::for_event(&e).as_str().to_owned()),
        )
    };
    assert_eq!(
        stored,
        vec![
            at("t.events.single.v1", untenanted("no-tenant-1")),
            at("t.events.acme.v1", with_tenant("acme-1", "acme")),
            at("t.events.acme.v1", with_tenant("acme-2", "acme")),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untenanted_events_go_to_single_unless_a_tenant_is_required_on_2_9() {
    untenanted_events_go_to_single_unless_a_tenant_is_required(ServerVersion::V2_9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untenanted_events_go_to_single_unless_a_tenant_is_required_on_2_15() {
    untenanted_events_go_to_single_unless_a_tenant_is_required(ServerVersion::V2_15).await;
}
