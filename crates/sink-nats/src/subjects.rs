//! The sink's subject configuration, built once from [`SinkConfig`] and shared by every `send`.

use sink_core::event::CloudEvent;
use sink_core::subject::{SubjectConfig, SubjectError, SubjectTemplate, TokenRule};

use crate::config::SinkConfig;
use crate::error::StartError;

/// A parsed template with its token rule and default tenant.
#[derive(Debug, Clone)]
pub(crate) struct Subjects {
    config: SubjectConfig,
}

impl Subjects {
    pub(crate) fn new(config: &SinkConfig) -> Result<Self, StartError> {
        let template = SubjectTemplate::parse(&config.subject_template)?;
        let mut subjects = SubjectConfig::new(template).with_token_rule(TokenRule {
            max_len: config.max_token_len,
            ..TokenRule::default()
        })?;
        if let Some(tenant) = &config.default_tenant {
            subjects = subjects.with_default_tenant(tenant.clone())?;
        }
        Ok(Self { config: subjects })
    }

    pub(crate) fn render(&self, event: &CloudEvent) -> Result<String, SubjectError> {
        self.config.render(event)
    }

    /// The subject filter covering every subject the template can produce.
    pub(crate) fn filter(&self) -> String {
        self.config.filter()
    }
}
