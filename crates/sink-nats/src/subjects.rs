//! The sink's subject configuration, built once from [`SinkConfig`] and shared by every `send`.

use sink_core::event::CloudEvent;
use sink_core::subject::{MissingTenant, SubjectConfig, SubjectError, SubjectTemplate, TokenRule};

use crate::config::SinkConfig;
use crate::error::StartError;

/// A parsed template with its token rule and what events without a tenant get.
#[derive(Debug, Clone)]
pub(crate) struct Subjects {
    config: SubjectConfig,
}

impl Subjects {
    pub(crate) fn new(config: &SinkConfig) -> Result<Self, StartError> {
        let template = SubjectTemplate::parse(&config.subject_template)?;
        let missing_tenant = if config.require_tenant {
            MissingTenant::Refuse
        } else {
            MissingTenant::Default(config.default_tenant.clone())
        };
        let subjects = SubjectConfig::new(template)
            .with_token_rule(TokenRule {
                max_len: config.max_token_len,
                ..TokenRule::default()
            })?
            .with_missing_tenant(missing_tenant)?;
        Ok(Self { config: subjects })
    }

    /// The core configuration (for tools that render subjects as the sink does).
    pub(crate) fn into_config(self) -> SubjectConfig {
        self.config
    }

    pub(crate) fn render(&self, event: &CloudEvent) -> Result<String, SubjectError> {
        self.config.render(event)
    }

    /// The subject filter covering every subject the template can produce.
    pub(crate) fn filter(&self) -> String {
        self.config.filter()
    }
}
