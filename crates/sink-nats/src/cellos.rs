//! The `cellos` feature: `JetStreamSink` implements the seed's `cellos_core::ports::EventSink`, so
//! services on `cellos-sink-jetstream` switch by changing the constructor only.

use cellos_core::error::CellosError;
use cellos_core::ports::EventSink as CellosEventSink;
use cellos_core::types::CloudEventV1;
use sink_core::event::CloudEvent;

use crate::JetStreamSink;

/// Converts the seed's event shape into a validated [`CloudEvent`] (the same JSON shape).
pub fn from_cellos(event: &CloudEventV1) -> Result<CloudEvent, CellosError> {
    let value = serde_json::to_value(event).map_err(|e| CellosError::EventSink(e.to_string()))?;
    CloudEvent::from_json_value(value).map_err(|e| CellosError::EventSink(e.to_string()))
}

#[async_trait::async_trait]
impl CellosEventSink for JetStreamSink {
    /// Returns once the event is stored (the seed returned as soon as it was queued in the client).
    async fn emit(&self, event: &CloudEventV1) -> Result<(), CellosError> {
        let event = from_cellos(event)?;
        JetStreamSink::emit(self, &event)
            .await
            .map(|_| ())
            .map_err(|e| CellosError::EventSink(e.to_string()))
    }
}
