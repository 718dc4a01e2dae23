//! Subject templates (`cellos.events.{tenantId}.v1`): parsing, per-event rendering that can never
//! widen or redirect a subject, and the stream filter covering every subject a template can produce.
//!
//! A template is a dot-separated list of tokens. Each token is either a literal or a placeholder that
//! occupies the whole token. Known placeholders:
//!
//! | placeholder  | value                                                                        |
//! |--------------|------------------------------------------------------------------------------|
//! | `{tenantId}` | [`CloudEvent::tenant_id`] (`data.tenantId`, else the `tenantid` extension), else the default tenant ([`DEFAULT_TENANT`], `single`, unless configured otherwise or [`MissingTenant::Refuse`]) |
//! | `{subject}`  | the CloudEvent `subject` attribute                                           |
//! | `{type}`     | the CloudEvent `type` attribute (usually dotted, so only for dot-free types)  |
//!
//! Every substituted value must be exactly one token under the [`TokenRule`] (by default
//! `^[A-Za-z0-9_-]{1,64}$`); values are checked, never rewritten, so `evil.other-tenant` is an
//! error for that one event instead of a publish to someone else's subject.
//!
//! An event without a tenant goes to the default tenant `single`, as with the seed
//! (`cellos-sink-jetstream`'s `TENANT_ID_DEFAULT_TOKEN`), so a service switching over sees no new
//! errors; [`MissingTenant::Refuse`] makes such an event fail alone with
//! [`SubjectError::MissingTenant`] instead.
//!
//! ```
//! use sink_core::event::CloudEvent;
//! use sink_core::subject::{MissingTenant, SubjectConfig, SubjectError, SubjectTemplate};
//!
//! let config = SubjectConfig::new(SubjectTemplate::parse("cellos.events.{tenantId}.v1")?);
//! assert_eq!(config.filter(), "cellos.events.*.v1");
//! let acme = CloudEvent::new("1", "/s", "t").with_extension("tenantid", "acme");
//! assert_eq!(config.render(&acme)?, "cellos.events.acme.v1");
//! let evil = CloudEvent::new("2", "/s", "t").with_extension("tenantid", "evil.other-tenant");
//! assert!(matches!(config.render(&evil), Err(SubjectError::InvalidToken { .. })));
//!
//! let untenanted = CloudEvent::new("3", "/s", "t");
//! assert_eq!(config.render(&untenanted)?, "cellos.events.single.v1");
//! let strict = config.with_missing_tenant(MissingTenant::Refuse)?;
//! assert_eq!(strict.render(&untenanted), Err(SubjectError::MissingTenant));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::str::FromStr;

use crate::event::{preview, CloudEvent};

/// Default longest substituted token, in bytes.
pub const DEFAULT_TOKEN_MAX_LEN: usize = 64;

/// Default longest rendered subject, in bytes.
pub const DEFAULT_MAX_SUBJECT_LEN: usize = 255;

/// Longest template text accepted by [`SubjectTemplate::parse`], in bytes.
pub const MAX_TEMPLATE_LEN: usize = 255;

/// The token `{tenantId}` becomes for an event without a tenant, unless configured otherwise: the
/// seed's `TENANT_ID_DEFAULT_TOKEN`.
pub const DEFAULT_TENANT: &str = "single";

/// What `{tenantId}` becomes for an event that carries no tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MissingTenant {
    /// This token (by default [`DEFAULT_TENANT`]); it must be valid under the token rule.
    Default(String),
    /// The event fails alone with [`SubjectError::MissingTenant`].
    Refuse,
}

impl Default for MissingTenant {
    fn default() -> Self {
        MissingTenant::Default(DEFAULT_TENANT.to_owned())
    }
}

/// A value a template can substitute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Placeholder {
    /// `{tenantId}`: the tenant of the event.
    TenantId,
    /// `{subject}`: the CloudEvent `subject` attribute.
    Subject,
    /// `{type}`: the CloudEvent `type` attribute.
    Type,
}

impl Placeholder {
    /// Every known placeholder.
    pub const ALL: [Placeholder; 3] = [
        Placeholder::TenantId,
        Placeholder::Subject,
        Placeholder::Type,
    ];

    /// The name between the braces, e.g. `tenantId`.
    pub fn name(self) -> &'static str {
        match self {
            Placeholder::TenantId => "tenantId",
            Placeholder::Subject => "subject",
            Placeholder::Type => "type",
        }
    }

    fn from_name(name: &str) -> Option<Placeholder> {
        Placeholder::ALL.into_iter().find(|p| p.name() == name)
    }
}

impl fmt::Display for Placeholder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{{{}}}", self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Placeholder(Placeholder),
}

/// A parsed subject template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectTemplate {
    text: String,
    segments: Vec<Segment>,
}

/// Why a template or subject configuration is rejected. Positions are 0-based byte offsets into the
/// template text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TemplateError {
    /// The template is empty.
    #[error("subject template is empty; use e.g. cellos.events.{{tenantId}}.v1")]
    Empty,
    /// The template is longer than [`MAX_TEMPLATE_LEN`].
    #[error("subject template is {len} bytes; the limit is {max}")]
    TooLong {
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Two dots in a row, or a leading or trailing dot.
    #[error("subject template has an empty token at byte {position}; remove the extra `.`")]
    EmptyToken {
        /// Where the empty token starts.
        position: usize,
    },
    /// A literal `*` or `>`.
    #[error("subject template has wildcard `{ch}` at byte {position}; a publish subject must be concrete (placeholders are written {{tenantId}})")]
    Wildcard {
        /// Where it is.
        position: usize,
        /// `*` or `>`.
        ch: char,
    },
    /// A `{` without its `}` or the reverse.
    #[error("subject template has an unbalanced brace at byte {position}; write placeholders as {{name}}")]
    UnbalancedBrace {
        /// Where the brace is.
        position: usize,
    },
    /// A placeholder shares its token with other text.
    #[error("subject template placeholder at byte {position} does not fill its whole token; separate it with `.` (e.g. a.{{tenantId}}.b)")]
    PartialPlaceholder {
        /// Where the placeholder starts.
        position: usize,
    },
    /// A placeholder name this crate does not know.
    #[error("subject template has unknown placeholder {{{name}}} at byte {position}; known: {{tenantId}}, {{subject}}, {{type}}")]
    UnknownPlaceholder {
        /// Where it starts.
        position: usize,
        /// The name found (escaped preview).
        name: String,
    },
    /// A character that may not appear in a subject token.
    #[error("subject template has invalid character {ch:?} at byte {position}; literal tokens use printable ASCII except . * > {{ }}")]
    InvalidCharacter {
        /// Where it is.
        position: usize,
        /// The character.
        ch: char,
    },
    /// The template starts with `$`, the prefix of system subjects (`$SYS`, `$JS`).
    #[error("subject template starts with `$`, reserved for system subjects; start with an application prefix")]
    ReservedPrefix,
    /// [`TokenRule::max_len`] is zero.
    #[error("token rule max_len is 0; it must allow at least one byte (default 64)")]
    ZeroTokenLength,
    /// [`TokenRule::extra_allowed`] holds a character that could widen or split a subject.
    #[error("token rule extra_allowed contains {ch:?}; only printable ASCII other than . * > {{ }} may be added")]
    UnsafeExtraChar {
        /// The character.
        ch: char,
    },
    /// The default tenant is not a valid token under the rule.
    #[error("default tenant \"{value_preview}\" is not a valid subject token ({reason}); tokens are A-Z a-z 0-9 _ - (plus the rule's extra_allowed), at most max_len bytes (default 64)")]
    InvalidDefaultTenant {
        /// The value (escaped, at most 32 characters).
        value_preview: String,
        /// What is wrong with it.
        reason: TokenFault,
    },
    /// Even the shortest subject the template can render exceeds the subject length limit.
    #[error("subject template renders at least {min_len} bytes, over the max_subject_len of {max}; shorten the template or raise the limit")]
    TemplateExceedsSubjectLimit {
        /// Length with one-byte placeholder values.
        min_len: usize,
        /// The configured limit.
        max: usize,
    },
}

/// What is wrong with one substituted value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenFault {
    /// The value is empty.
    #[error("it is empty")]
    Empty,
    /// The value is longer than the rule allows.
    #[error("it is {len} bytes, over the limit of {max}")]
    TooLong {
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The value holds a character the rule does not allow (`.`, `*`, `>`, whitespace, ...).
    #[error("character {ch:?} at position {position} is not allowed")]
    ForbiddenChar {
        /// The character.
        ch: char,
        /// Its index, in characters.
        position: usize,
    },
}

/// Why one event has no subject. The event fails alone; nothing is published for it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SubjectError {
    /// The template uses `{tenantId}`, the event carries no tenant and the configuration requires
    /// one ([`MissingTenant::Refuse`]).
    #[error("event has no tenant (no string data.tenantId, no tenantid extension) and the sink requires one; set data.tenantId on the event, or turn require_tenant off to send it to the default tenant")]
    MissingTenant,
    /// The template uses `{subject}` but the event has no `subject` attribute.
    #[error("template uses {placeholder} but the event has no such attribute; set it on the event or change the template")]
    MissingAttribute {
        /// The placeholder that had no value.
        placeholder: Placeholder,
    },
    /// A substituted value is not exactly one valid token.
    #[error("value \"{value_preview}\" for {placeholder} is not a valid subject token: {reason}; tokens are A-Z a-z 0-9 _ - (plus the rule's extra_allowed), at most max_len bytes (default 64)")]
    InvalidToken {
        /// The placeholder.
        placeholder: Placeholder,
        /// The value (escaped, at most 32 characters).
        value_preview: String,
        /// What is wrong with it.
        reason: TokenFault,
    },
    /// The rendered subject exceeds the configured limit.
    #[error("rendered subject is {len} bytes, over the max_subject_len of {max}; shorten the substituted values")]
    TooLong {
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The rendered subject would start with `$` (a system subject).
    #[error("rendered subject would start with `$` (value \"{value_preview}\"), reserved for system subjects")]
    ReservedPrefix {
        /// The leading value (escaped, at most 32 characters).
        value_preview: String,
    },
}

impl SubjectTemplate {
    /// Parses a template such as `cellos.events.{tenantId}.v1`.
    pub fn parse(text: &str) -> Result<SubjectTemplate, TemplateError> {
        if text.is_empty() {
            return Err(TemplateError::Empty);
        }
        if text.len() > MAX_TEMPLATE_LEN {
            return Err(TemplateError::TooLong {
                len: text.len(),
                max: MAX_TEMPLATE_LEN,
            });
        }
        let mut segments = Vec::new();
        let mut start = 0;
        for token in text.split('.') {
            segments.push(parse_token(token, start)?);
            start += token.len() + 1;
        }
        if text.starts_with('$') {
            return Err(TemplateError::ReservedPrefix);
        }
        Ok(SubjectTemplate {
            text: text.to_owned(),
            segments,
        })
    }

    /// The template text as parsed.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// How many tokens every rendered subject has.
    pub fn token_count(&self) -> usize {
        self.segments.len()
    }

    /// The placeholders used, in order of appearance (repeats included).
    pub fn placeholders(&self) -> impl Iterator<Item = Placeholder> + '_ {
        self.segments.iter().filter_map(|segment| match segment {
            Segment::Placeholder(p) => Some(*p),
            Segment::Literal(_) => None,
        })
    }

    /// The subject filter covering every subject this template can render: each placeholder becomes
    /// `*`. A stream capturing this filter captures every event the sink publishes.
    pub fn filter(&self) -> String {
        let tokens: Vec<&str> = self
            .segments
            .iter()
            .map(|segment| match segment {
                Segment::Literal(text) => text.as_str(),
                Segment::Placeholder(_) => "*",
            })
            .collect();
        tokens.join(".")
    }

    /// Bytes of the shortest possible rendering (one byte per placeholder).
    fn min_rendered_len(&self) -> usize {
        let tokens: usize = self
            .segments
            .iter()
            .map(|segment| match segment {
                Segment::Literal(text) => text.len(),
                Segment::Placeholder(_) => 1,
            })
            .sum();
        tokens + self.segments.len() - 1
    }
}

impl FromStr for SubjectTemplate {
    type Err = TemplateError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        SubjectTemplate::parse(text)
    }
}

impl fmt::Display for SubjectTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

fn parse_token(token: &str, start: usize) -> Result<Segment, TemplateError> {
    if token.is_empty() {
        return Err(TemplateError::EmptyToken { position: start });
    }
    let mut open_at = None;
    let mut first_open = None;
    for (offset, ch) in token.char_indices() {
        match ch {
            '{' if open_at.is_some() => {
                return Err(TemplateError::UnbalancedBrace {
                    position: start + offset,
                })
            }
            '{' => {
                open_at = Some(offset);
                first_open.get_or_insert(offset);
            }
            '}' if open_at.take().is_none() => {
                return Err(TemplateError::UnbalancedBrace {
                    position: start + offset,
                })
            }
            _ => {}
        }
    }
    if let Some(offset) = open_at {
        return Err(TemplateError::UnbalancedBrace {
            position: start + offset,
        });
    }
    let Some(first_open) = first_open else {
        return parse_literal(token, start);
    };
    let name = token
        .strip_prefix('{')
        .and_then(|rest| rest.strip_suffix('}'))
        .filter(|name| !name.contains(['{', '}']));
    match name {
        Some(name) => Placeholder::from_name(name)
            .map(Segment::Placeholder)
            .ok_or_else(|| TemplateError::UnknownPlaceholder {
                position: start,
                name: preview(name),
            }),
        None => Err(TemplateError::PartialPlaceholder {
            position: start + first_open,
        }),
    }
}

fn parse_literal(token: &str, start: usize) -> Result<Segment, TemplateError> {
    for (offset, ch) in token.char_indices() {
        let position = start + offset;
        match ch {
            '*' | '>' => return Err(TemplateError::Wildcard { position, ch }),
            '!'..='~' => {}
            _ => return Err(TemplateError::InvalidCharacter { position, ch }),
        }
    }
    Ok(Segment::Literal(token.to_owned()))
}

/// Which values may fill a placeholder: 1 to `max_len` bytes from `A-Z a-z 0-9 _ -` plus
/// `extra_allowed`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRule {
    /// Longest value in bytes (default 64).
    pub max_len: usize,
    /// Characters allowed beyond `A-Z a-z 0-9 _ -` (printable ASCII other than `. * > { }`).
    pub extra_allowed: Vec<char>,
}

impl Default for TokenRule {
    fn default() -> Self {
        TokenRule {
            max_len: DEFAULT_TOKEN_MAX_LEN,
            extra_allowed: Vec::new(),
        }
    }
}

impl TokenRule {
    /// Checks that `value` is exactly one allowed token.
    pub fn check(&self, value: &str) -> Result<(), TokenFault> {
        if value.is_empty() {
            return Err(TokenFault::Empty);
        }
        if let Some((position, ch)) = value.chars().enumerate().find(|(_, ch)| {
            !(ch.is_ascii_alphanumeric()
                || *ch == '_'
                || *ch == '-'
                || self.extra_allowed.contains(ch))
        }) {
            return Err(TokenFault::ForbiddenChar { ch, position });
        }
        if value.len() > self.max_len {
            return Err(TokenFault::TooLong {
                len: value.len(),
                max: self.max_len,
            });
        }
        Ok(())
    }

    fn check_rule(&self) -> Result<(), TemplateError> {
        if self.max_len == 0 {
            return Err(TemplateError::ZeroTokenLength);
        }
        match self
            .extra_allowed
            .iter()
            .find(|ch| !matches!(ch, '!'..='~') || matches!(ch, '.' | '*' | '>' | '{' | '}'))
        {
            Some(&ch) => Err(TemplateError::UnsafeExtraChar { ch }),
            None => Ok(()),
        }
    }
}

/// Everything needed to turn an event into its subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectConfig {
    template: SubjectTemplate,
    token_rule: TokenRule,
    missing_tenant: MissingTenant,
    max_subject_len: usize,
}

impl SubjectConfig {
    /// A configuration with the default token rule, the default tenant `single` and a 255-byte
    /// subject limit.
    pub fn new(template: SubjectTemplate) -> SubjectConfig {
        SubjectConfig {
            template,
            token_rule: TokenRule::default(),
            missing_tenant: MissingTenant::default(),
            max_subject_len: DEFAULT_MAX_SUBJECT_LEN,
        }
    }

    /// Replaces the token rule; fails if the rule is unsafe or rejects the default tenant.
    pub fn with_token_rule(mut self, rule: TokenRule) -> Result<SubjectConfig, TemplateError> {
        self.token_rule = rule;
        self.checked()
    }

    /// Sets the tenant used for events that carry none; it must be a valid token.
    pub fn with_default_tenant(
        self,
        tenant: impl Into<String>,
    ) -> Result<SubjectConfig, TemplateError> {
        self.with_missing_tenant(MissingTenant::Default(tenant.into()))
    }

    /// Sets what happens to events without a tenant; a default tenant must be a valid token.
    pub fn with_missing_tenant(
        mut self,
        policy: MissingTenant,
    ) -> Result<SubjectConfig, TemplateError> {
        self.missing_tenant = policy;
        self.checked()
    }

    /// Sets the longest rendered subject in bytes; fails if the template cannot fit.
    pub fn with_max_subject_len(mut self, max: usize) -> Result<SubjectConfig, TemplateError> {
        self.max_subject_len = max;
        self.checked()
    }

    fn checked(self) -> Result<SubjectConfig, TemplateError> {
        self.token_rule.check_rule()?;
        if let MissingTenant::Default(tenant) = &self.missing_tenant {
            self.token_rule.check(tenant).map_err(|reason| {
                TemplateError::InvalidDefaultTenant {
                    value_preview: preview(tenant),
                    reason,
                }
            })?;
        }
        let min_len = self.template.min_rendered_len();
        if min_len > self.max_subject_len {
            return Err(TemplateError::TemplateExceedsSubjectLimit {
                min_len,
                max: self.max_subject_len,
            });
        }
        Ok(self)
    }

    /// The template.
    pub fn template(&self) -> &SubjectTemplate {
        &self.template
    }

    /// The token rule.
    pub fn token_rule(&self) -> &TokenRule {
        &self.token_rule
    }

    /// The default tenant; `None` when a tenant is required.
    pub fn default_tenant(&self) -> Option<&str> {
        match &self.missing_tenant {
            MissingTenant::Default(tenant) => Some(tenant),
            MissingTenant::Refuse => None,
        }
    }

    /// What happens to events without a tenant.
    pub fn missing_tenant(&self) -> &MissingTenant {
        &self.missing_tenant
    }

    /// The longest rendered subject, in bytes.
    pub fn max_subject_len(&self) -> usize {
        self.max_subject_len
    }

    /// The subject filter covering every subject this configuration can render.
    pub fn filter(&self) -> String {
        self.template.filter()
    }

    /// The subject for `event`, or the reason this one event cannot be published.
    pub fn render(&self, event: &CloudEvent) -> Result<String, SubjectError> {
        let mut subject = String::with_capacity(self.template.text.len() + 32);
        for (index, segment) in self.template.segments.iter().enumerate() {
            if index > 0 {
                subject.push('.');
            }
            let value = match segment {
                Segment::Literal(text) => {
                    subject.push_str(text);
                    continue;
                }
                Segment::Placeholder(placeholder) => self.value_for(*placeholder, event)?,
            };
            if index == 0 && value.starts_with('$') {
                return Err(SubjectError::ReservedPrefix {
                    value_preview: preview(value),
                });
            }
            subject.push_str(value);
        }
        if subject.len() > self.max_subject_len {
            return Err(SubjectError::TooLong {
                len: subject.len(),
                max: self.max_subject_len,
            });
        }
        Ok(subject)
    }

    fn value_for<'a>(
        &'a self,
        placeholder: Placeholder,
        event: &'a CloudEvent,
    ) -> Result<&'a str, SubjectError> {
        let value = match placeholder {
            Placeholder::TenantId => event
                .tenant_id()
                .or(self.default_tenant())
                .ok_or(SubjectError::MissingTenant)?,
            Placeholder::Subject => event
                .subject
                .as_deref()
                .ok_or(SubjectError::MissingAttribute { placeholder })?,
            Placeholder::Type => event.ty.as_str(),
        };
        self.token_rule
            .check(value)
            .map_err(|reason| SubjectError::InvalidToken {
                placeholder,
                value_preview: preview(value),
                reason,
            })?;
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn config(template: &str) -> SubjectConfig {
        SubjectConfig::new(SubjectTemplate::parse(template).unwrap())
    }

    fn tenant_event(tenant: &str) -> CloudEvent {
        CloudEvent::new("1", "/s", "t").with_extension("tenantid", tenant)
    }

    #[test]
    fn parse_error_table() {
        let long = "a".repeat(256);
        let cases = [
            ("", TemplateError::Empty),
            (long.as_str(), TemplateError::TooLong { len: 256, max: 255 }),
            ("a..b", TemplateError::EmptyToken { position: 2 }),
            (".a", TemplateError::EmptyToken { position: 0 }),
            ("a.", TemplateError::EmptyToken { position: 2 }),
            (
                "a.*.b",
                TemplateError::Wildcard {
                    position: 2,
                    ch: '*',
                },
            ),
            (
                "a.>",
                TemplateError::Wildcard {
                    position: 2,
                    ch: '>',
                },
            ),
            (
                "a.b*c",
                TemplateError::Wildcard {
                    position: 3,
                    ch: '*',
                },
            ),
            (
                "a.{tenantId",
                TemplateError::UnbalancedBrace { position: 2 },
            ),
            (
                "a.tenantId}",
                TemplateError::UnbalancedBrace { position: 10 },
            ),
            ("a.}x{", TemplateError::UnbalancedBrace { position: 2 }),
            (
                "a.{{tenantId}}",
                TemplateError::UnbalancedBrace { position: 3 },
            ),
            (
                "a.{x}{y}",
                TemplateError::PartialPlaceholder { position: 2 },
            ),
            (
                "a.{ten.antId}",
                TemplateError::UnbalancedBrace { position: 2 },
            ),
            (
                "a.x{tenantId}",
                TemplateError::PartialPlaceholder { position: 3 },
            ),
            (
                "a.{tenantId}x",
                TemplateError::PartialPlaceholder { position: 2 },
            ),
            (
                "a.{tenant}",
                TemplateError::UnknownPlaceholder {
                    position: 2,
                    name: "tenant".into(),
                },
            ),
            (
                "a.{}",
                TemplateError::UnknownPlaceholder {
                    position: 2,
                    name: "".into(),
                },
            ),
            (
                "a b",
                TemplateError::InvalidCharacter {
                    position: 1,
                    ch: ' ',
                },
            ),
            (
                "a.\u{e9}",
                TemplateError::InvalidCharacter {
                    position: 2,
                    ch: '\u{e9}',
                },
            ),
            (
                "a.b\tc",
                TemplateError::InvalidCharacter {
                    position: 3,
                    ch: '\t',
                },
            ),
            ("$SYS.{tenantId}", TemplateError::ReservedPrefix),
        ];
        for (text, expected) in cases {
            assert_eq!(SubjectTemplate::parse(text), Err(expected), "{text:?}");
        }
    }

    #[test]
    fn parse_and_filter_table() {
        let cases = [
            ("cellos.events.{tenantId}.v1", "cellos.events.*.v1", 4),
            ("events", "events", 1),
            ("{tenantId}.{type}.{subject}", "*.*.*", 3),
            ("a-b_c.x:y~z", "a-b_c.x:y~z", 2),
        ];
        for (text, filter, tokens) in cases {
            let template = SubjectTemplate::parse(text).unwrap();
            assert_eq!(template.filter(), filter);
            assert_eq!(template.token_count(), tokens);
            assert_eq!(template.to_string(), text);
        }
        let template: SubjectTemplate = "x.{subject}.{tenantId}".parse().unwrap();
        assert_eq!(
            template.placeholders().collect::<Vec<_>>(),
            vec![Placeholder::Subject, Placeholder::TenantId]
        );
    }

    #[test]
    fn render_table() {
        let seed = config("cellos.events.{tenantId}.v1");
        let cases: Vec<(CloudEvent, Result<String, SubjectError>)> = vec![
            (tenant_event("acme"), Ok("cellos.events.acme.v1".into())),
            (
                CloudEvent::new("1", "/s", "t").with_data_json(json!({"tenantId": "from-data"})),
                Ok("cellos.events.from-data.v1".into()),
            ),
            (
                CloudEvent::new("1", "/s", "t"),
                Ok("cellos.events.single.v1".into()),
            ),
            (
                tenant_event("evil.other-tenant"),
                Err(SubjectError::InvalidToken {
                    placeholder: Placeholder::TenantId,
                    value_preview: "evil.other-tenant".into(),
                    reason: TokenFault::ForbiddenChar {
                        ch: '.',
                        position: 4,
                    },
                }),
            ),
            (
                tenant_event("*"),
                Err(SubjectError::InvalidToken {
                    placeholder: Placeholder::TenantId,
                    value_preview: "*".into(),
                    reason: TokenFault::ForbiddenChar {
                        ch: '*',
                        position: 0,
                    },
                }),
            ),
            (
                tenant_event(""),
                Err(SubjectError::InvalidToken {
                    placeholder: Placeholder::TenantId,
                    value_preview: "".into(),
                    reason: TokenFault::Empty,
                }),
            ),
            (
                tenant_event("a\nb"),
                Err(SubjectError::InvalidToken {
                    placeholder: Placeholder::TenantId,
                    value_preview: "a\\nb".into(),
                    reason: TokenFault::ForbiddenChar {
                        ch: '\n',
                        position: 1,
                    },
                }),
            ),
            (
                tenant_event(&"x".repeat(65)),
                Err(SubjectError::InvalidToken {
                    placeholder: Placeholder::TenantId,
                    value_preview: format!("{}...", "x".repeat(29)),
                    reason: TokenFault::TooLong { len: 65, max: 64 },
                }),
            ),
        ];
        for (event, expected) in cases {
            assert_eq!(seed.render(&event), expected, "{event:?}");
        }
    }

    #[test]
    fn default_tenant_fills_only_missing_tenants() {
        let with_default = config("e.{tenantId}")
            .with_default_tenant("shared")
            .unwrap();
        assert_eq!(
            with_default
                .render(&CloudEvent::new("1", "/s", "t"))
                .as_deref(),
            Ok("e.shared")
        );
        assert_eq!(
            with_default.render(&tenant_event("acme")).as_deref(),
            Ok("e.acme")
        );
        // An invalid tenant is an error, never silently replaced by the default.
        assert!(matches!(
            with_default.render(&tenant_event("a b")),
            Err(SubjectError::InvalidToken { .. })
        ));
    }

    #[test]
    fn events_without_a_tenant_table() {
        let untenanted = CloudEvent::new("1", "/s", "t");
        // Not a string: no tenant, as the seed read it.
        let numeric = CloudEvent::new("1", "/s", "t").with_data_json(json!({"tenantId": 7}));
        let null = CloudEvent::new("1", "/s", "t").with_data_json(json!({"tenantId": null}));
        let shared = MissingTenant::Default("shared".into());
        let invalid_dot = Err(SubjectError::InvalidToken {
            placeholder: Placeholder::TenantId,
            value_preview: "a.b".into(),
            reason: TokenFault::ForbiddenChar {
                ch: '.',
                position: 1,
            },
        });
        let invalid_empty = Err(SubjectError::InvalidToken {
            placeholder: Placeholder::TenantId,
            value_preview: "".into(),
            reason: TokenFault::Empty,
        });
        let cases: Vec<(MissingTenant, CloudEvent, Result<&str, SubjectError>)> = vec![
            (
                MissingTenant::default(),
                untenanted.clone(),
                Ok("e.single.v1"),
            ),
            (MissingTenant::default(), numeric.clone(), Ok("e.single.v1")),
            (MissingTenant::default(), null.clone(), Ok("e.single.v1")),
            (
                MissingTenant::default(),
                tenant_event("acme"),
                Ok("e.acme.v1"),
            ),
            (
                MissingTenant::default(),
                tenant_event("a.b"),
                invalid_dot.clone(),
            ),
            (
                MissingTenant::default(),
                tenant_event(""),
                invalid_empty.clone(),
            ),
            (shared.clone(), untenanted.clone(), Ok("e.shared.v1")),
            (shared, tenant_event("acme"), Ok("e.acme.v1")),
            (
                MissingTenant::Refuse,
                untenanted.clone(),
                Err(SubjectError::MissingTenant),
            ),
            (
                MissingTenant::Refuse,
                numeric.clone(),
                Err(SubjectError::MissingTenant),
            ),
            (
                MissingTenant::Refuse,
                null.clone(),
                Err(SubjectError::MissingTenant),
            ),
            (MissingTenant::Refuse, tenant_event("acme"), Ok("e.acme.v1")),
            (MissingTenant::Refuse, tenant_event("a.b"), invalid_dot),
            (MissingTenant::Refuse, tenant_event(""), invalid_empty),
        ];
        for (policy, event, expected) in cases {
            let cfg = config("e.{tenantId}.v1")
                .with_missing_tenant(policy.clone())
                .unwrap();
            assert_eq!(
                cfg.render(&event).as_deref().map_err(Clone::clone),
                expected,
                "{policy:?} {event:?}"
            );
        }
        // A template without {tenantId} needs no tenant, required or not.
        let no_tenant = config("e.{type}")
            .with_missing_tenant(MissingTenant::Refuse)
            .unwrap();
        assert_eq!(no_tenant.render(&untenanted).as_deref(), Ok("e.t"));
        assert_eq!(config("e").default_tenant(), Some(DEFAULT_TENANT));
        assert_eq!(no_tenant.default_tenant(), None);
    }

    #[test]
    fn other_placeholders_and_limits() {
        let cfg = config("{type}.{subject}");
        let event = CloudEvent::new("1", "/s", "created").with_subject("order-7");
        assert_eq!(cfg.render(&event).as_deref(), Ok("created.order-7"));
        assert_eq!(
            cfg.render(&CloudEvent::new("1", "/s", "created")),
            Err(SubjectError::MissingAttribute {
                placeholder: Placeholder::Subject
            })
        );
        let dotted = CloudEvent::new("1", "/s", "com.example.created").with_subject("x");
        assert!(matches!(
            cfg.render(&dotted),
            Err(SubjectError::InvalidToken {
                placeholder: Placeholder::Type,
                ..
            })
        ));
        let dollar_rule = TokenRule {
            max_len: 64,
            extra_allowed: vec!['$'],
        };
        let first = config("{tenantId}.events")
            .with_token_rule(dollar_rule)
            .unwrap();
        assert_eq!(
            first.render(&tenant_event("$SYS")),
            Err(SubjectError::ReservedPrefix {
                value_preview: "$SYS".into()
            })
        );
        assert_eq!(
            first.render(&tenant_event("a$b")).as_deref(),
            Ok("a$b.events")
        );
        let short = config("ab.{tenantId}").with_max_subject_len(6).unwrap();
        assert_eq!(short.render(&tenant_event("cde")).as_deref(), Ok("ab.cde"));
        assert_eq!(
            short.render(&tenant_event("cdef")),
            Err(SubjectError::TooLong { len: 7, max: 6 })
        );
    }

    #[test]
    fn config_error_table() {
        let base = || config("a.{tenantId}");
        assert_eq!(
            base().with_token_rule(TokenRule {
                max_len: 0,
                extra_allowed: vec![]
            }),
            Err(TemplateError::ZeroTokenLength)
        );
        for ch in ['.', '*', '>', ' ', '{', '\u{e9}', '\n'] {
            assert_eq!(
                base().with_token_rule(TokenRule {
                    max_len: 8,
                    extra_allowed: vec![ch]
                }),
                Err(TemplateError::UnsafeExtraChar { ch }),
                "{ch:?}"
            );
        }
        assert_eq!(
            base().with_default_tenant("a.b"),
            Err(TemplateError::InvalidDefaultTenant {
                value_preview: "a.b".into(),
                reason: TokenFault::ForbiddenChar {
                    ch: '.',
                    position: 1
                },
            })
        );
        // Only a default tenant is checked against the rule; refusing needs no token.
        let tight = || TokenRule {
            max_len: 2,
            extra_allowed: vec![],
        };
        assert!(matches!(
            base().with_token_rule(tight()),
            Err(TemplateError::InvalidDefaultTenant { .. })
        ));
        assert!(base()
            .with_missing_tenant(MissingTenant::Refuse)
            .unwrap()
            .with_token_rule(tight())
            .is_ok());
        // A later rule change re-checks the default tenant.
        let tight = TokenRule {
            max_len: 2,
            extra_allowed: vec![],
        };
        assert_eq!(
            base()
                .with_default_tenant("abc")
                .unwrap()
                .with_token_rule(tight),
            Err(TemplateError::InvalidDefaultTenant {
                value_preview: "abc".into(),
                reason: TokenFault::TooLong { len: 3, max: 2 },
            })
        );
        assert_eq!(
            base().with_max_subject_len(2),
            Err(TemplateError::TemplateExceedsSubjectLimit { min_len: 3, max: 2 })
        );
    }

    #[test]
    fn error_messages_snapshot() {
        let messages: Vec<String> = vec![
            config("cellos.events.{tenantId}.v1")
                .render(&tenant_event("evil.other-tenant"))
                .unwrap_err()
                .to_string(),
            SubjectTemplate::parse("a.{tenant}")
                .unwrap_err()
                .to_string(),
            SubjectTemplate::parse("a.x{tenantId}")
                .unwrap_err()
                .to_string(),
            SubjectError::MissingTenant.to_string(),
        ];
        insta::assert_debug_snapshot!(messages);
    }

    /// The default rule, written independently of `TokenRule::check`.
    fn is_default_token(value: &str) -> bool {
        (1..=64).contains(&value.len())
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    }

    fn hostile() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a.b".to_owned()),
            Just("*".to_owned()),
            Just(">".to_owned()),
            Just(String::new()),
            Just(" ".to_owned()),
            Just("$SYS".to_owned()),
            Just("x".repeat(300)),
            Just("tenant\r\nPUB x 1".to_owned()),
            Just("ténant".to_owned()),
            "[A-Za-z0-9_-]{1,70}",
            "[A-Za-z0-9_.*> $-]{0,12}",
            "\\PC{0,80}",
            any::<String>(),
        ]
    }

    fn template_text() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("cellos.events.{tenantId}.v1".to_owned()),
            Just("{tenantId}".to_owned()),
            Just("{tenantId}.x.{tenantId}".to_owned()),
            Just("t.{tenantId}.{subject}".to_owned()),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn tenant_can_never_widen_or_redirect(
            template in template_text(),
            tenant in hostile(),
            in_data in any::<bool>(),
        ) {
            let cfg = config(&template);
            let event = if in_data {
                CloudEvent::new("1", "/s", "t").with_data_json(json!({ "tenantId": tenant }))
            } else {
                tenant_event(&tenant)
            }
            .with_subject("s");
            let filter = cfg.filter();
            match cfg.render(&event) {
                Ok(subject) => {
                    prop_assert!(is_default_token(&tenant), "accepted {:?}", tenant);
                    let tokens: Vec<&str> = subject.split('.').collect();
                    let filter_tokens: Vec<&str> = filter.split('.').collect();
                    prop_assert_eq!(tokens.len(), cfg.template().token_count());
                    prop_assert_eq!(tokens.len(), filter_tokens.len());
                    let mut placeholders = cfg.template().placeholders();
                    for (token, pattern) in tokens.iter().zip(&filter_tokens) {
                        if *pattern == "*" {
                            let expected = match placeholders.next() {
                                Some(Placeholder::TenantId) => tenant.as_str(),
                                _ => "s",
                            };
                            prop_assert_eq!(*token, expected);
                        } else {
                            prop_assert_eq!(token, pattern);
                        }
                    }
                    prop_assert!(subject.len() <= DEFAULT_MAX_SUBJECT_LEN);
                    prop_assert!(!subject.starts_with('$'));
                }
                Err(err) => {
                    prop_assert!(!is_default_token(&tenant), "rejected {:?}: {}", tenant, err);
                    let typed = matches!(
                        err,
                        SubjectError::InvalidToken { placeholder: Placeholder::TenantId, .. }
                    );
                    prop_assert!(typed, "{:?}", err);
                    if let SubjectError::InvalidToken { value_preview, .. } = &err {
                        prop_assert!(value_preview.chars().count() <= 32);
                        prop_assert!(!value_preview.chars().any(char::is_control));
                    }
                }
            }
        }

        #[test]
        fn parsed_templates_are_well_formed(text in "[a-z{}.*> $]{0,24}|\\PC{0,24}") {
            if let Ok(template) = SubjectTemplate::parse(&text) {
                let filter = template.filter();
                prop_assert_eq!(filter.split('.').count(), template.token_count());
                for token in filter.split('.') {
                    prop_assert!(!token.is_empty());
                    let concrete = !token.contains(['*', '>', ' ', '{', '}']);
                    prop_assert!(token == "*" || concrete, "token {:?}", token);
                }
                prop_assert!(!text.starts_with('$'));
            }
        }
    }
}
