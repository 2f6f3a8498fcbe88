//! Webhooks: what a webhook source accepts and how each delivery becomes
//! Segment messages. Three payload kinds, a closed set: a generic JSON
//! payload mapped by the source's [`Mapping`]; Facebook Lead Ads `leadgen`
//! change notifications (→ `Lead Submitted`); and social mentions
//! (→ `Social Mention`, kept with their text for later sentiment analysis).
//! A source with a secret only takes deliveries signed with it
//! (`X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the body>`, as Facebook
//! and GitHub sign). Pure: the server does the HTTP around it.

use crate::event::EventType;
use crate::ids::SourceId;
use crate::mapping::{message_id_for, Mapping, MappingError, RowError};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sha2::Sha256;
use std::fmt;
use std::str::FromStr;

/// The header a signed delivery carries.
pub const SIGNATURE_HEADER: &str = "x-hub-signature-256";
pub const LEAD_SUBMITTED: &str = "Lead Submitted";
pub const SOCIAL_MENTION: &str = "Social Mention";

/// The payloads a webhook source takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WebhookFormat {
    /// Any JSON object (or array of them), turned into events by a mapping.
    Generic,
    /// Facebook Lead Ads `leadgen` change notifications.
    FacebookLeads,
    /// Mentions on social platforms.
    SocialMentions,
}

impl WebhookFormat {
    pub const ALL: [WebhookFormat; 3] =
        [WebhookFormat::Generic, WebhookFormat::FacebookLeads, WebhookFormat::SocialMentions];

    pub fn as_str(self) -> &'static str {
        match self {
            WebhookFormat::Generic => "generic",
            WebhookFormat::FacebookLeads => "facebook_leads",
            WebhookFormat::SocialMentions => "social_mentions",
        }
    }
}

impl fmt::Display for WebhookFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The name is not a webhook format.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("webhook format {0:?} is not one of generic, facebook_leads, social_mentions")]
pub struct UnknownWebhookFormat(pub String);

impl FromStr for WebhookFormat {
    type Err = UnknownWebhookFormat;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let normalized = value.trim().to_ascii_lowercase().replace('-', "_");
        WebhookFormat::ALL
            .into_iter()
            .find(|format| format.as_str() == normalized)
            .ok_or_else(|| UnknownWebhookFormat(value.to_owned()))
    }
}

/// How a webhook source reads and checks its deliveries.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSettings {
    pub format: WebhookFormat,
    /// Shared secret for the HMAC signature; unsigned deliveries are refused when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// The `hub.verify_token` Facebook sends when the webhook is subscribed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_token: Option<String>,
    /// The mapping of a generic webhook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mapping: Option<Mapping>,
}

impl WebhookSettings {
    /// Checks the settings without any I/O.
    pub fn validate(&self) -> Result<(), MappingError> {
        let invalid = |field: &str, message: &str| Err(MappingError { field: field.into(), message: message.into() });
        match (&self.format, &self.mapping) {
            (WebhookFormat::Generic, None) => return invalid("mapping", "a generic webhook needs a mapping"),
            (WebhookFormat::Generic, Some(mapping)) => mapping.validate()?,
            (_, Some(_)) => return invalid("mapping", "only a generic webhook takes a mapping"),
            (_, None) => {}
        }
        if self.secret.as_deref().is_some_and(|secret| secret.len() < 8) {
            return invalid("secret", "a secret must be at least 8 characters");
        }
        if self.verify_token.as_deref().is_some_and(str::is_empty) {
            return invalid("verify_token", "a verify token must not be empty");
        }
        Ok(())
    }
}

/// Why a delivery's signature was not accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the delivery is not signed: {SIGNATURE_HEADER} is required")]
    Missing,
    #[error("{SIGNATURE_HEADER} must be sha256=<hex digest>")]
    Malformed,
    #[error("the signature does not match the body")]
    Mismatch,
}

/// Checks `sha256=<hex>` against the HMAC-SHA256 of the body, in constant time.
pub fn verify_signature(secret: &str, body: &[u8], header: Option<&str>) -> Result<(), SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?.trim();
    let hex = header.strip_prefix("sha256=").ok_or(SignatureError::Malformed)?;
    let digest = decode_hex(hex).ok_or(SignatureError::Malformed)?;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(body);
    mac.verify_slice(&digest).map_err(|_| SignatureError::Mismatch)
}

/// The signature header value for a body, as a sender computes it.
pub fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let hex: String = digest.iter().map(|byte| format!("{byte:02x}")).collect();
    format!("sha256={hex}")
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if text.len() & 1 == 1 {
        return None;
    }
    (0..text.len()).step_by(2).map(|start| u8::from_str_radix(text.get(start..start + 2)?, 16).ok()).collect()
}

/// A delivery whose shape is not the one its format expects.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct PayloadError {
    pub field: String,
    pub message: String,
}

impl PayloadError {
    fn new(field: &str, message: impl Into<String>) -> Self {
        PayloadError { field: field.into(), message: message.into() }
    }
}

/// The messages of one delivery, each built or refused on its own.
pub type Messages = Vec<Result<Map<String, Value>, RowError>>;

/// Turns a delivery into Segment messages.
pub fn messages_for(settings: &WebhookSettings, source: &SourceId, payload: &Value) -> Result<Messages, PayloadError> {
    match settings.format {
        WebhookFormat::Generic => {
            let mapping = settings.mapping.as_ref().ok_or_else(|| PayloadError::new("mapping", "no mapping"))?;
            let records = objects(payload, "body")?;
            Ok(records.into_iter().map(|record| mapping.message_for(source, record)).collect())
        }
        WebhookFormat::FacebookLeads => facebook_leads(source, payload),
        WebhookFormat::SocialMentions => {
            let list = match payload.get("mentions") {
                Some(mentions) => mentions,
                None => payload,
            };
            Ok(objects(list, "mentions")?.into_iter().map(|mention| social_mention(source, mention)).collect())
        }
    }
}

/// An object or an array of objects.
fn objects<'a>(payload: &'a Value, field: &str) -> Result<Vec<&'a Map<String, Value>>, PayloadError> {
    match payload {
        Value::Object(object) => Ok(vec![object]),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(index, item)| {
                item.as_object().ok_or_else(|| PayloadError::new(&format!("{field}[{index}]"), "must be an object"))
            })
            .collect(),
        _ => Err(PayloadError::new(field, format!("{field} must be a JSON object or an array of objects"))),
    }
}

/// `{"object":"page","entry":[{"id","time","changes":[{"field":"leadgen","value":{…}}]}]}`.
/// Changes other than `leadgen` are skipped, as Facebook may send them on the
/// same subscription.
fn facebook_leads(source: &SourceId, payload: &Value) -> Result<Messages, PayloadError> {
    if payload.get("object").and_then(Value::as_str) != Some("page") {
        return Err(PayloadError::new("object", "a Lead Ads notification has \"object\": \"page\""));
    }
    let entries = payload
        .get("entry")
        .and_then(Value::as_array)
        .ok_or_else(|| PayloadError::new("entry", "entry must be an array"))?;
    let mut messages = Vec::new();
    for (index, entry) in entries.iter().enumerate() {
        let changes = entry
            .get("changes")
            .and_then(Value::as_array)
            .ok_or_else(|| PayloadError::new(&format!("entry[{index}].changes"), "changes must be an array"))?;
        for change in changes.iter().filter(|change| change.get("field").and_then(Value::as_str) == Some("leadgen")) {
            messages.push(lead(source, change.get("value").unwrap_or(&Value::Null)));
        }
    }
    Ok(messages)
}

fn text_of(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(text) if !text.trim().is_empty() => Some(text.trim().to_owned()),
        Value::Number(number) => Some(number.to_string()),
        _ => None,
    }
}

fn lead(source: &SourceId, value: &Value) -> Result<Map<String, Value>, RowError> {
    let lead_id = text_of(value.get("leadgen_id"))
        .ok_or_else(|| RowError::new(Some("leadgen_id"), "a leadgen change needs a leadgen_id"))?;
    let mut properties = Map::new();
    for key in ["leadgen_id", "form_id", "page_id", "ad_id", "adgroup_id"] {
        if let Some(text) = text_of(value.get(key)) {
            properties.insert(key.into(), Value::String(text));
        }
    }
    // The notification names the lead; its answers (`field_data`, as the
    // Graph API returns them) come along only when the sender includes them.
    let mut traits = Map::new();
    if let Some(fields) = value.get("field_data").and_then(Value::as_array) {
        for field in fields {
            let (Some(name), Some(answer)) = (
                field.get("name").and_then(Value::as_str),
                field.get("values").and_then(Value::as_array).and_then(|values| text_of(values.first())),
            ) else {
                continue;
            };
            let trait_name = match name {
                "email" => "email",
                "phone_number" | "phone" => "phone",
                other => other,
            };
            traits.insert(trait_name.to_owned(), Value::String(answer));
        }
    }
    let mut message = Map::new();
    message.insert("type".into(), json!("track"));
    message.insert("event".into(), json!(LEAD_SUBMITTED));
    message.insert("properties".into(), Value::Object(properties));
    let mut context = Map::new();
    context.insert(
        "externalIds".into(),
        json!([{"id": lead_id, "type": "facebook_lead_id", "collection": "users", "encoding": "none"}]),
    );
    if !traits.is_empty() {
        context.insert("traits".into(), Value::Object(traits));
    }
    message.insert("context".into(), Value::Object(context));
    if let Some(time) = value.get("created_time") {
        let timestamp = match time {
            Value::Number(seconds) => seconds.as_i64().and_then(|seconds| chrono::DateTime::from_timestamp(seconds, 0)),
            Value::String(text) => crate::collect::parse_timestamp(text).ok(),
            _ => None,
        }
        .ok_or_else(|| RowError::new(Some("created_time"), "created_time must be unix seconds or ISO 8601"))?;
        message.insert("timestamp".into(), json!(crate::event::format_timestamp(timestamp)));
    }
    let id = message_id_for(source, EventType::Track, Some(LEAD_SUBMITTED), &lead_id);
    message.insert("messageId".into(), Value::String(id));
    Ok(message)
}

/// `{"platform","author":{"handle","name"} | "author_handle","text","url","time","id"}`.
fn social_mention(source: &SourceId, mention: &Map<String, Value>) -> Result<Map<String, Value>, RowError> {
    let platform = text_of(mention.get("platform"))
        .map(|platform| platform.to_ascii_lowercase())
        .ok_or_else(|| RowError::new(Some("platform"), "a mention needs its platform"))?;
    let author = mention.get("author");
    let handle = text_of(author.and_then(|author| author.get("handle")))
        .or_else(|| text_of(mention.get("author_handle")))
        .ok_or_else(|| RowError::new(Some("author.handle"), "a mention needs its author's handle"))?;
    let handle = handle.trim_start_matches('@').to_lowercase();
    let text = text_of(mention.get("text")).ok_or_else(|| RowError::new(Some("text"), "a mention needs its text"))?;
    let url = text_of(mention.get("url"));
    let time = text_of(mention.get("time")).or_else(|| text_of(mention.get("created_at")));
    let mut properties = Map::new();
    properties.insert("platform".into(), Value::String(platform.clone()));
    properties.insert("author_handle".into(), Value::String(handle.clone()));
    if let Some(name) =
        text_of(author.and_then(|author| author.get("name"))).or_else(|| text_of(mention.get("author_name")))
    {
        properties.insert("author_name".into(), Value::String(name));
    }
    properties.insert("text".into(), Value::String(text.clone()));
    if let Some(url) = &url {
        properties.insert("url".into(), Value::String(url.clone()));
    }
    let mention_id = text_of(mention.get("id"));
    if let Some(id) = &mention_id {
        properties.insert("mention_id".into(), Value::String(id.clone()));
    }
    let mut message = Map::new();
    message.insert("type".into(), json!("track"));
    message.insert("event".into(), json!(SOCIAL_MENTION));
    message.insert("properties".into(), Value::Object(properties));
    let identifier_type = format!("{platform}_handle");
    message.insert(
        "context".into(),
        json!({"externalIds": [{"id": handle, "type": identifier_type, "collection": "users", "encoding": "none"}]}),
    );
    if let Some(time) = &time {
        let parsed = crate::collect::parse_timestamp(time)
            .map_err(|_| RowError::new(Some("time"), format!("time {time:?} is not an ISO 8601 timestamp")))?;
        message.insert("timestamp".into(), json!(crate::event::format_timestamp(parsed)));
    }
    // A mention is the same mention however often it is delivered: its id,
    // else its URL, else who said what when.
    let key = mention_id.or(url).unwrap_or_else(|| format!("{handle}\u{1f}{}\u{1f}{text}", time.unwrap_or_default()));
    let id = message_id_for(source, EventType::Track, Some(SOCIAL_MENTION), &format!("{platform}:{key}"));
    message.insert("messageId".into(), Value::String(id));
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source() -> SourceId {
        SourceId::new("src_hook")
    }

    fn settings(format: WebhookFormat) -> WebhookSettings {
        WebhookSettings { format, secret: None, verify_token: None, mapping: None }
    }

    #[test]
    fn signatures_are_checked_against_the_body() {
        let body = br#"{"object":"page"}"#;
        let signature = sign("a-long-secret", body);
        assert!(signature.starts_with("sha256=") && signature.len() == 7 + 64);
        assert_eq!(verify_signature("a-long-secret", body, Some(&signature)), Ok(()));
        assert_eq!(verify_signature("a-long-secret", b"{}", Some(&signature)), Err(SignatureError::Mismatch));
        assert_eq!(verify_signature("another-secret", body, Some(&signature)), Err(SignatureError::Mismatch));
        assert_eq!(verify_signature("a-long-secret", body, None), Err(SignatureError::Missing));
        assert_eq!(verify_signature("a-long-secret", body, Some("md5=abc")), Err(SignatureError::Malformed));
        assert_eq!(verify_signature("a-long-secret", body, Some("sha256=zz")), Err(SignatureError::Malformed));
    }

    #[test]
    fn leadgen_changes_become_lead_submitted_events() {
        let payload = json!({"object": "page", "entry": [{"id": "p1", "time": 1_789_000_000, "changes": [
            {"field": "leadgen", "value": {"leadgen_id": "444", "form_id": "f9", "page_id": "p1", "ad_id": "a3",
             "created_time": 1_789_000_000,
             "field_data": [{"name": "email", "values": ["Erin@Example.com"]}, {"name": "full_name", "values": ["Erin Walsh"]}]}},
            {"field": "feed", "value": {"item": "status"}}
        ]}]});
        let messages = messages_for(&settings(WebhookFormat::FacebookLeads), &source(), &payload).unwrap();
        assert_eq!(messages.len(), 1, "only leadgen changes count");
        let message = messages[0].as_ref().unwrap();
        assert_eq!(message["event"], json!(LEAD_SUBMITTED));
        assert_eq!(message["properties"]["form_id"], json!("f9"));
        assert_eq!(message["context"]["externalIds"][0]["type"], json!("facebook_lead_id"));
        assert_eq!(message["context"]["traits"]["email"], json!("Erin@Example.com"));
        assert_eq!(message["timestamp"], json!("2026-09-10T00:26:40.000Z"));
        let again = messages_for(&settings(WebhookFormat::FacebookLeads), &source(), &payload).unwrap();
        assert_eq!(again[0].as_ref().unwrap()["messageId"], message["messageId"], "redelivery is a duplicate");

        let no_id =
            json!({"object": "page", "entry": [{"changes": [{"field": "leadgen", "value": {"form_id": "f"}}]}]});
        let refused = messages_for(&settings(WebhookFormat::FacebookLeads), &source(), &no_id).unwrap();
        assert_eq!(refused[0].as_ref().unwrap_err().column.as_deref(), Some("leadgen_id"));
        let wrong = messages_for(&settings(WebhookFormat::FacebookLeads), &source(), &json!({"object": "user"}));
        assert_eq!(wrong.unwrap_err().field, "object");
        let no_entry = messages_for(&settings(WebhookFormat::FacebookLeads), &source(), &json!({"object": "page"}));
        assert_eq!(no_entry.unwrap_err().field, "entry");
    }

    #[test]
    fn mentions_keep_their_text_and_identify_the_author_by_handle() {
        let payload = json!({"mentions": [
            {"platform": "Twitter", "author": {"handle": "@Ann_Lee", "name": "Ann"}, "text": "Love the new reports!",
             "url": "https://x.example/ann/1", "time": "2026-10-01T12:00:00Z"},
            {"platform": "instagram", "text": "no author"}
        ]});
        let messages = messages_for(&settings(WebhookFormat::SocialMentions), &source(), &payload).unwrap();
        let mention = messages[0].as_ref().unwrap();
        assert_eq!(mention["event"], json!(SOCIAL_MENTION));
        assert_eq!(mention["properties"]["text"], json!("Love the new reports!"));
        assert_eq!(mention["properties"]["platform"], json!("twitter"));
        assert_eq!(
            mention["context"]["externalIds"][0],
            json!({"id": "ann_lee", "type": "twitter_handle", "collection": "users", "encoding": "none"})
        );
        assert_eq!(mention["timestamp"], json!("2026-10-01T12:00:00.000Z"));
        assert_eq!(messages[1].as_ref().unwrap_err().column.as_deref(), Some("author.handle"));
        let single = json!({"platform": "reddit", "author_handle": "dan", "text": "meh", "id": "r1"});
        assert_eq!(messages_for(&settings(WebhookFormat::SocialMentions), &source(), &single).unwrap().len(), 1);
        let bad = messages_for(&settings(WebhookFormat::SocialMentions), &source(), &json!("text"));
        assert_eq!(bad.unwrap_err().field, "mentions");
    }

    #[test]
    fn generic_payloads_follow_the_mapping() {
        let mapping = Mapping::from_toml(
            "event = \"Form Submitted\"\nrow_key = \"submission.id\"\n[identifiers]\nemail = \"submission.email\"\n[properties]\nform = \"form\"",
        )
        .unwrap();
        let settings = WebhookSettings { mapping: Some(mapping), ..settings(WebhookFormat::Generic) };
        assert_eq!(settings.validate(), Ok(()));
        let payload = json!([
            {"form": "contact", "submission": {"id": "s1", "email": "a@example.com"}},
            {"form": "contact", "submission": {"id": "s2"}}
        ]);
        let messages = messages_for(&settings, &source(), &payload).unwrap();
        assert_eq!(messages[0].as_ref().unwrap()["properties"]["form"], json!("contact"));
        assert!(messages[1].as_ref().unwrap_err().reason.starts_with("no identifier"));
        assert_eq!(messages_for(&settings, &source(), &json!([1])).unwrap_err().field, "body[0]");
    }

    #[test]
    fn settings_are_validated() {
        assert_eq!(settings(WebhookFormat::Generic).validate().unwrap_err().field, "mapping");
        let short = WebhookSettings { secret: Some("short".into()), ..settings(WebhookFormat::SocialMentions) };
        assert_eq!(short.validate().unwrap_err().field, "secret");
        assert_eq!("facebook-leads".parse::<WebhookFormat>(), Ok(WebhookFormat::FacebookLeads));
        assert!("zapier".parse::<WebhookFormat>().is_err());
    }
}
