//! Mappings: how one record of a silo (a CSV row, a JSON Lines object, a
//! webhook's JSON payload) becomes one Segment message. A mapping names the
//! columns that identify the customer, the one that says when it happened,
//! the ones that become traits or event properties, and the call or event
//! name. It is written in TOML by people, so it is checked whole
//! ([`Mapping::validate`]) before any record is read, and every record that
//! does not fit is refused with the column at fault ([`RowError`]).
//!
//! The message a mapping builds then goes through the same validation as the
//! tracking API ([`crate::collect::normalize_message`]); its `messageId` is
//! derived from the source and the record's key ([`message_id_for`]), so the
//! same record imported twice is the same message and is stored once.

use crate::event::EventType;
use crate::identity::{ADVERTISING_ID, ANONYMOUS_ID, DEVICE_ID, EMAIL, PHONE, USER_ID};
use crate::ids::SourceId;
use chrono::format::{Item, StrftimeItems};
use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Number, Value};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt;

/// How one record becomes one message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mapping {
    /// The call each record becomes: `identify` for contacts, `track` for
    /// things that happened; `page`, `screen` and `group` too.
    #[serde(rename = "type", default = "track")]
    pub event_type: EventType,
    /// The event name of a `track`: fixed, or read from a column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<EventName>,
    /// The page or screen name of a `page` or `screen`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<Field>,
    /// The group (account) of a `group` call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<Field>,
    /// The column(s) that tell records apart; without them a record is told
    /// apart by its whole content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub row_key: Option<RowKey>,
    /// When the record happened; without it, when it was imported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<TimestampField>,
    /// Identifier type (`user_id`, `email`, `phone`, `crm_id`, …) → column.
    #[serde(default)]
    pub identifiers: BTreeMap<String, Field>,
    /// Trait name → column.
    #[serde(default)]
    pub traits: BTreeMap<String, Field>,
    /// Event property name → column.
    #[serde(default)]
    pub properties: BTreeMap<String, Field>,
}

fn track() -> EventType {
    EventType::Track
}

/// A `track`'s event name.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EventName {
    Fixed(String),
    /// Read from a column; `values` renames what the column holds (a ticket's
    /// `status` of `open` → `Ticket Opened`). A value not listed is refused
    /// when `values` is given.
    FromColumn {
        column: String,
        #[serde(default)]
        values: BTreeMap<String, String>,
    },
}

/// Where a value comes from and what it must be.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Field {
    /// A column, taken as text.
    Column(String),
    Typed(TypedField),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TypedField {
    /// The column to read; absent for a constant `value`.
    #[serde(default)]
    pub column: Option<String>,
    #[serde(default, rename = "type")]
    pub value_type: ValueType,
    /// A constant (`currency = { value = "EUR" }`), or the value for an empty cell.
    #[serde(default)]
    pub value: Option<Value>,
}

/// What a cell holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ValueType {
    #[default]
    String,
    Number,
    Integer,
    Boolean,
}

/// The column(s) that make a record's key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RowKey {
    One(String),
    Many(Vec<String>),
}

/// The timestamp column and how it is written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TimestampField {
    /// ISO 8601 / RFC 3339, or a bare date.
    Column(String),
    Formatted {
        column: String,
        /// `iso8601`, `unix` (seconds), `unix_ms`, or a strftime pattern such
        /// as `%d/%m/%Y %H:%M` (read as UTC unless it has `%z`).
        #[serde(default = "iso8601")]
        format: String,
    },
}

fn iso8601() -> String {
    "iso8601".to_owned()
}

/// A mapping that cannot be used, with the setting at fault.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct MappingError {
    pub field: String,
    pub message: String,
}

impl MappingError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        MappingError { field: field.into(), message: message.into() }
    }
}

/// A record the mapping could not turn into a message; the import goes on.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct RowError {
    /// The column at fault, when there is one.
    pub column: Option<String>,
    pub reason: String,
}

impl RowError {
    pub fn new(column: Option<&str>, reason: impl Into<String>) -> Self {
        RowError { column: column.map(str::to_owned), reason: reason.into() }
    }
}

/// One cell of a record.
#[derive(Clone, Copy, Debug)]
pub enum Cell<'a> {
    Text(&'a str),
    Json(&'a Value),
}

impl Cell<'_> {
    fn is_empty(&self) -> bool {
        match self {
            Cell::Text(text) => text.trim().is_empty(),
            Cell::Json(Value::Null) => true,
            Cell::Json(Value::String(text)) => text.trim().is_empty(),
            Cell::Json(_) => false,
        }
    }

    /// The cell as text: strings as they are, other JSON as JSON.
    fn text(&self) -> std::borrow::Cow<'_, str> {
        match self {
            Cell::Text(text) => std::borrow::Cow::Borrowed(text.trim()),
            Cell::Json(Value::String(text)) => std::borrow::Cow::Borrowed(text.trim()),
            Cell::Json(other) => std::borrow::Cow::Owned(other.to_string()),
        }
    }
}

/// A record: its cells, looked up by the column names the mapping uses.
pub trait Record {
    fn cell(&self, column: &str) -> Option<Cell<'_>>;
    /// The record's whole content, the key of a record without a `row_key`.
    fn content(&self) -> String;
}

/// A JSON object as a record; a column may be a dotted path (`author.handle`).
impl Record for Map<String, Value> {
    fn cell(&self, column: &str) -> Option<Cell<'_>> {
        if let Some(value) = self.get(column) {
            return Some(Cell::Json(value));
        }
        let mut segments = column.split('.');
        let mut value = self.get(segments.next()?)?;
        for segment in segments {
            value = value.get(segment)?;
        }
        Some(Cell::Json(value))
    }

    fn content(&self) -> String {
        // serde_json's map keeps keys sorted, so equal objects give equal text.
        Value::Object(self.clone()).to_string()
    }
}

impl Mapping {
    /// Reads a mapping from TOML and checks it.
    pub fn from_toml(text: &str) -> Result<Mapping, MappingError> {
        let mapping: Mapping = toml::from_str(text).map_err(|error| {
            let message = error.message().to_owned();
            let field = error
                .span()
                .map(|span| {
                    let line = text[..span.start.min(text.len())].lines().count().max(1);
                    format!("line {line}")
                })
                .unwrap_or_else(|| "mapping".to_owned());
            MappingError::new(field, message)
        })?;
        mapping.validate()?;
        Ok(mapping)
    }

    /// Checks everything that can be checked without a record.
    pub fn validate(&self) -> Result<(), MappingError> {
        match self.event_type {
            EventType::Alias => {
                return Err(MappingError::new("type", "alias cannot be imported; map identifiers instead"))
            }
            EventType::Track if self.event.is_none() => {
                return Err(MappingError::new("event", "a track mapping needs an event name or column"))
            }
            EventType::Group if self.group_id.is_none() => {
                return Err(MappingError::new("group_id", "a group mapping needs a group_id column"))
            }
            _ => {}
        }
        if self.event.is_some() && self.event_type != EventType::Track {
            return Err(MappingError::new("event", format!("only track has an event name, not {}", self.event_type)));
        }
        if self.identifiers.is_empty() {
            return Err(MappingError::new("identifiers", "map at least one identifier column"));
        }
        for (kind, field) in &self.identifiers {
            let valid_kind = !kind.is_empty()
                && kind.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.');
            if !valid_kind {
                return Err(MappingError::new(
                    format!("identifiers.{kind}"),
                    "identifier types are lowercase letters, digits, _ and .",
                ));
            }
            field.validate(&format!("identifiers.{kind}"))?;
        }
        for (section, fields) in [("traits", &self.traits), ("properties", &self.properties)] {
            for (name, field) in fields {
                field.validate(&format!("{section}.{name}"))?;
            }
        }
        for (setting, field) in [("name", &self.name), ("group_id", &self.group_id)] {
            if let Some(field) = field {
                field.validate(setting)?;
            }
        }
        if let Some(RowKey::Many(columns)) = &self.row_key {
            if columns.is_empty() {
                return Err(MappingError::new("row_key", "list at least one column, or leave row_key out"));
            }
        }
        if let Some(TimestampField::Formatted { format, .. }) = &self.timestamp {
            TimeFormat::parse(format)?;
        }
        Ok(())
    }

    /// Every column the mapping reads, each once, in a stable order.
    pub fn columns(&self) -> Vec<&str> {
        let fields = self.identifiers.values().chain(self.traits.values()).chain(self.properties.values());
        let mut all: Vec<&str> =
            fields.chain(self.name.iter()).chain(self.group_id.iter()).filter_map(Field::column).collect();
        if let Some(EventName::FromColumn { column, .. }) = &self.event {
            all.push(column);
        }
        if let Some(timestamp) = &self.timestamp {
            all.push(timestamp.column());
        }
        match &self.row_key {
            Some(RowKey::One(column)) => all.push(column),
            Some(RowKey::Many(many)) => all.extend(many.iter().map(String::as_str)),
            None => {}
        }
        let mut columns: Vec<&str> = Vec::with_capacity(all.len());
        for column in all {
            if !columns.contains(&column) {
                columns.push(column);
            }
        }
        columns
    }

    /// The columns of a file's header that the mapping needs but the header lacks.
    pub fn missing_columns<'a>(&'a self, header: &[&str]) -> Vec<&'a str> {
        self.columns().into_iter().filter(|column| !header.contains(column)).collect()
    }

    /// Builds the Segment message for one record. `source` and the record's
    /// key decide its `messageId`.
    pub fn message_for(&self, source: &SourceId, record: &dyn Record) -> Result<Map<String, Value>, RowError> {
        let mut message = Map::new();
        message.insert("type".into(), Value::String(self.event_type.as_str().into()));

        let event_name = match &self.event {
            None => None,
            Some(EventName::Fixed(name)) => Some(name.clone()),
            Some(EventName::FromColumn { column, values }) => {
                let cell = record.cell(column).filter(|cell| !cell.is_empty());
                let cell = cell.ok_or_else(|| RowError::new(Some(column), format!("{column} is empty")))?;
                let text = cell.text();
                if values.is_empty() {
                    Some(text.into_owned())
                } else {
                    let renamed = values.get(text.as_ref()).ok_or_else(|| {
                        let known: Vec<&str> = values.keys().map(String::as_str).collect();
                        RowError::new(Some(column), format!("{column} {text:?} is not one of {}", known.join(", ")))
                    })?;
                    Some(renamed.clone())
                }
            }
        };
        if let Some(name) = &event_name {
            message.insert("event".into(), Value::String(name.clone()));
        }

        let mut traits = Map::new();
        let mut external_ids = Vec::new();
        let mut device = Map::new();
        for (kind, field) in &self.identifiers {
            let Some(value) = field.read(record)? else {
                continue;
            };
            let text = match value {
                Value::String(text) => text,
                other => other.to_string(),
            };
            match kind.as_str() {
                USER_ID => _ = message.insert("userId".into(), Value::String(text)),
                ANONYMOUS_ID => _ = message.insert("anonymousId".into(), Value::String(text)),
                EMAIL | PHONE => _ = traits.insert(kind.clone(), Value::String(text)),
                DEVICE_ID => _ = device.insert("id".into(), Value::String(text)),
                ADVERTISING_ID => _ = device.insert("advertisingId".into(), Value::String(text)),
                _ => external_ids.push(serde_json::json!({
                    "id": text, "type": kind, "collection": "users", "encoding": "none"
                })),
            }
        }
        let has_identifier = message.contains_key("userId")
            || message.contains_key("anonymousId")
            || !traits.is_empty()
            || !device.is_empty()
            || !external_ids.is_empty();
        if !has_identifier {
            let columns: Vec<&str> = self.identifiers.values().filter_map(Field::column).collect();
            return Err(RowError::new(
                columns.first().copied(),
                format!("no identifier: {} empty", plural_columns(&columns)),
            ));
        }

        for (name, field) in &self.traits {
            if let Some(value) = field.read(record)? {
                traits.insert(name.clone(), value);
            }
        }
        let mut properties = Map::new();
        for (name, field) in &self.properties {
            if let Some(value) = field.read(record)? {
                properties.insert(name.clone(), value);
            }
        }
        for (setting, field) in [("name", &self.name), ("groupId", &self.group_id)] {
            if let Some(value) = field.as_ref().map(|field| field.read(record)).transpose()?.flatten() {
                message.insert(setting.into(), value);
            }
        }

        let mut context = Map::new();
        if !device.is_empty() {
            context.insert("device".into(), Value::Object(device));
        }
        if !external_ids.is_empty() {
            context.insert("externalIds".into(), Value::Array(external_ids));
        }
        if !traits.is_empty() {
            // An identify's traits describe the customer; on other calls the
            // customer's known traits travel in the context, as Segment puts them.
            if self.event_type == EventType::Identify {
                message.insert("traits".into(), Value::Object(traits));
            } else {
                context.insert("traits".into(), Value::Object(traits));
            }
        }
        if !context.is_empty() {
            message.insert("context".into(), Value::Object(context));
        }
        if !properties.is_empty() {
            message.insert("properties".into(), Value::Object(properties));
        }

        if let Some(timestamp) = &self.timestamp {
            let column = timestamp.column();
            let cell = record
                .cell(column)
                .filter(|cell| !cell.is_empty())
                .ok_or_else(|| RowError::new(Some(column), format!("timestamp {column} is empty")))?;
            let format = match timestamp {
                TimestampField::Column(_) => TimeFormat::Iso8601,
                TimestampField::Formatted { format, .. } => {
                    TimeFormat::parse(format).map_err(|error| RowError::new(Some(column), error.message))?
                }
            };
            let time = format.read(cell).ok_or_else(|| {
                RowError::new(Some(column), format!("timestamp {column} {:?} is not {}", cell.text(), format))
            })?;
            message.insert("timestamp".into(), Value::String(crate::event::format_timestamp(time)));
        }

        let key = match &self.row_key {
            None => record.content(),
            Some(key) => {
                let columns: Vec<&str> = match key {
                    RowKey::One(column) => vec![column.as_str()],
                    RowKey::Many(many) => many.iter().map(String::as_str).collect(),
                };
                let mut parts = Vec::with_capacity(columns.len());
                for column in columns {
                    let cell = record.cell(column).filter(|cell| !cell.is_empty());
                    let cell = cell.ok_or_else(|| RowError::new(Some(column), format!("row key {column} is empty")))?;
                    parts.push(cell.text().into_owned());
                }
                parts.join(&ROW_KEY_SEPARATOR.to_string())
            }
        };
        let id = message_id_for(source, self.event_type, event_name.as_deref(), &key);
        message.insert("messageId".into(), Value::String(id));
        Ok(message)
    }
}

fn plural_columns(columns: &[&str]) -> String {
    match columns {
        [one] => format!("column {one} is"),
        many => format!("columns {} are", many.join(", ")),
    }
}

/// The `messageId` of a mapped record: the same source, call, event name and
/// record key always give the same id, so reimports are duplicates.
///
/// It reads `imp-<16 hex digits of a hash of source, call and event>-<key>`:
/// the key stays legible (a row traces back to its line), and rows whose keys
/// ascend, as most exports' ids do, get ascending ids, which the log's dedup
/// index takes far faster than random ones. A key too long or unprintable to
/// fit is hashed instead.
pub fn message_id_for(source: &SourceId, event_type: EventType, event: Option<&str>, key: &str) -> String {
    let mut hash = Sha256::new();
    for part in [source.as_str(), event_type.as_str(), event.unwrap_or("")] {
        hash.update(part.as_bytes());
        hash.update([0]);
    }
    let mut id = String::with_capacity(crate::collect::MAX_MESSAGE_ID_CHARS);
    id.push_str("imp-");
    push_hex(&mut id, &hash.clone().finalize()[..8]);
    id.push('-');
    let legible = id.len() + key.len() <= crate::collect::MAX_MESSAGE_ID_CHARS
        && !key.is_empty()
        && key.chars().all(|c| (c.is_ascii_graphic() && c != '|') || c == ' ' || c == ROW_KEY_SEPARATOR);
    if legible {
        id.extend(key.chars().map(|c| if c == ROW_KEY_SEPARATOR { '|' } else { c }));
    } else {
        hash.update(key.as_bytes());
        id.push('h');
        push_hex(&mut id, &hash.finalize()[..16]);
    }
    id
}

/// Joins the columns of a composite row key; `|` in the id shown.
const ROW_KEY_SEPARATOR: char = '\u{1f}';

fn push_hex(text: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for byte in bytes {
        text.push(DIGITS[usize::from(byte >> 4)] as char);
        text.push(DIGITS[usize::from(byte & 0xf)] as char);
    }
}

impl Field {
    fn column(&self) -> Option<&str> {
        match self {
            Field::Column(column) => Some(column),
            Field::Typed(typed) => typed.column.as_deref(),
        }
    }

    fn validate(&self, setting: &str) -> Result<(), MappingError> {
        match self {
            Field::Column(column) if column.is_empty() => Err(MappingError::new(setting, "column name is empty")),
            Field::Column(_) => Ok(()),
            Field::Typed(TypedField { column: None, value: None, .. }) => {
                Err(MappingError::new(setting, "give a column, a value, or both"))
            }
            Field::Typed(TypedField { value: Some(value), value_type, .. }) => {
                convert(Cell::Json(value), *value_type).map(|_| ()).map_err(|reason| MappingError::new(setting, reason))
            }
            Field::Typed(_) => Ok(()),
        }
    }

    /// The value for a record; `None` when the cell is empty and there is no default.
    fn read(&self, record: &dyn Record) -> Result<Option<Value>, RowError> {
        let (column, value_type, default) = match self {
            Field::Column(column) => (Some(column.as_str()), ValueType::String, None),
            Field::Typed(typed) => (typed.column.as_deref(), typed.value_type, typed.value.as_ref()),
        };
        let cell = column.and_then(|column| record.cell(column)).filter(|cell| !cell.is_empty());
        match (cell, default) {
            (Some(cell), _) => convert(cell, value_type)
                .map(Some)
                .map_err(|reason| RowError::new(column, format!("{} {reason}", column.unwrap_or("value")))),
            (None, Some(default)) => Ok(Some(default.clone())),
            (None, None) => Ok(None),
        }
    }
}

/// Converts a cell to the JSON value of its declared type; the error says why not.
fn convert(cell: Cell<'_>, value_type: ValueType) -> Result<Value, String> {
    match (value_type, cell) {
        (ValueType::String, Cell::Json(Value::String(text))) => Ok(Value::String(text.clone())),
        (ValueType::String, cell) => Ok(Value::String(cell.text().into_owned())),
        (ValueType::Number, Cell::Json(Value::Number(number))) => Ok(Value::Number(number.clone())),
        (ValueType::Integer, Cell::Json(Value::Number(number))) if number.is_i64() || number.is_u64() => {
            Ok(Value::Number(number.clone()))
        }
        (ValueType::Boolean, Cell::Json(Value::Bool(flag))) => Ok(Value::Bool(*flag)),
        (ValueType::Number, cell) => {
            let text = cell.text();
            if let Ok(integer) = text.parse::<i64>() {
                return Ok(Value::Number(integer.into()));
            }
            text.parse::<f64>()
                .ok()
                .and_then(Number::from_f64)
                .map(Value::Number)
                .ok_or_else(|| format!("{text:?} is not a number"))
        }
        (ValueType::Integer, cell) => {
            let text = cell.text();
            text.parse::<i64>()
                .map(|integer| Value::Number(integer.into()))
                .map_err(|_| format!("{text:?} is not an integer"))
        }
        (ValueType::Boolean, cell) => {
            let text = cell.text();
            match text.to_ascii_lowercase().as_str() {
                "true" | "yes" | "y" | "1" => Ok(Value::Bool(true)),
                "false" | "no" | "n" | "0" => Ok(Value::Bool(false)),
                _ => Err(format!("{text:?} is not a boolean")),
            }
        }
    }
}

impl TimestampField {
    fn column(&self) -> &str {
        match self {
            TimestampField::Column(column) | TimestampField::Formatted { column, .. } => column,
        }
    }
}

/// How a timestamp column is written.
#[derive(Clone, Debug, PartialEq, Eq)]
enum TimeFormat {
    Iso8601,
    UnixSeconds,
    UnixMillis,
    Pattern { pattern: String, has_offset: bool, has_time: bool },
}

impl TimeFormat {
    fn parse(format: &str) -> Result<TimeFormat, MappingError> {
        match format {
            "iso8601" | "rfc3339" => Ok(TimeFormat::Iso8601),
            "unix" => Ok(TimeFormat::UnixSeconds),
            "unix_ms" => Ok(TimeFormat::UnixMillis),
            pattern if pattern.contains('%') => {
                let items: Vec<Item<'_>> = StrftimeItems::new(pattern).collect();
                if items.iter().any(|item| matches!(item, Item::Error)) {
                    return Err(MappingError::new(
                        "timestamp.format",
                        format!("{pattern:?} is not a strftime pattern"),
                    ));
                }
                let has = |needles: &[&str]| needles.iter().any(|needle| pattern.contains(needle));
                Ok(TimeFormat::Pattern {
                    pattern: pattern.to_owned(),
                    has_offset: has(&["%z", "%:z", "%#z"]),
                    has_time: has(&["%H", "%I", "%T", "%R", "%s", "%M"]),
                })
            }
            other => Err(MappingError::new(
                "timestamp.format",
                format!("{other:?} is not iso8601, unix, unix_ms or a strftime pattern"),
            )),
        }
    }

    fn read(&self, cell: Cell<'_>) -> Option<DateTime<Utc>> {
        let text = cell.text();
        let text = text.as_ref();
        match self {
            TimeFormat::Iso8601 => crate::collect::parse_timestamp(text).ok(),
            TimeFormat::UnixSeconds => {
                let seconds: f64 = text.parse().ok()?;
                DateTime::from_timestamp_millis((seconds * 1000.0).round() as i64)
            }
            TimeFormat::UnixMillis => DateTime::from_timestamp_millis(text.parse().ok()?),
            TimeFormat::Pattern { pattern, has_offset: true, .. } => {
                DateTime::parse_from_str(text, pattern).ok().map(|time| time.with_timezone(&Utc))
            }
            TimeFormat::Pattern { pattern, has_time: true, .. } => {
                NaiveDateTime::parse_from_str(text, pattern).ok().map(|time| time.and_utc())
            }
            TimeFormat::Pattern { pattern, .. } => NaiveDate::parse_from_str(text, pattern)
                .ok()
                .and_then(|date| date.and_hms_opt(0, 0, 0))
                .map(|time| time.and_utc()),
        }
    }
}

impl fmt::Display for TimeFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TimeFormat::Iso8601 => f.write_str("an ISO 8601 timestamp"),
            TimeFormat::UnixSeconds => f.write_str("unix seconds"),
            TimeFormat::UnixMillis => f.write_str("unix milliseconds"),
            TimeFormat::Pattern { pattern, .. } => write!(f, "in the format {pattern}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A CSV-like record for tests: header and cells.
    struct Row(Vec<(&'static str, &'static str)>);

    impl Record for Row {
        fn cell(&self, column: &str) -> Option<Cell<'_>> {
            self.0.iter().find(|(name, _)| *name == column).map(|(_, value)| Cell::Text(value))
        }

        fn content(&self) -> String {
            self.0.iter().map(|(_, value)| *value).collect::<Vec<_>>().join(",")
        }
    }

    fn example(name: &str) -> Mapping {
        let text = match name {
            "orders" => include_str!("../../../examples/mappings/orders.toml"),
            "product_usage" => include_str!("../../../examples/mappings/product_usage.toml"),
            "support_tickets" => include_str!("../../../examples/mappings/support_tickets.toml"),
            "crm_contacts" => include_str!("../../../examples/mappings/crm_contacts.toml"),
            "leads" => include_str!("../../../examples/mappings/leads.toml"),
            other => panic!("no example mapping {other}"),
        };
        Mapping::from_toml(text).unwrap_or_else(|error| panic!("{name}: {error}"))
    }

    fn source() -> SourceId {
        SourceId::new("src_orders")
    }

    fn order(total: &'static str, ordered_at: &'static str) -> Row {
        Row(vec![
            ("order_id", "o-1"),
            ("customer_id", "u-1"),
            ("email", "Ann@Example.com"),
            ("ordered_at", ordered_at),
            ("total", total),
            ("currency", ""),
            ("items", "3"),
            ("coupon", ""),
        ])
    }

    #[test]
    fn every_shipped_example_mapping_is_valid() {
        for name in ["orders", "product_usage", "support_tickets", "crm_contacts", "leads"] {
            let mapping = example(name);
            assert!(!mapping.columns().is_empty(), "{name}");
        }
    }

    #[test]
    fn an_order_row_becomes_a_track_with_typed_properties() {
        let message = example("orders").message_for(&source(), &order("129.90", "2026-09-01T10:15:00Z")).unwrap();
        assert_eq!(message["type"], json!("track"));
        assert_eq!(message["event"], json!("Order Completed"));
        assert_eq!(message["userId"], json!("u-1"));
        assert_eq!(message["context"]["traits"]["email"], json!("Ann@Example.com"));
        assert_eq!(message["properties"]["revenue"], json!(129.9));
        assert_eq!(message["properties"]["products"], json!(3));
        assert_eq!(message["properties"]["currency"], json!("USD"), "an empty cell takes the default");
        assert!(message["properties"].get("coupon").is_none(), "empty cells are left out");
        assert_eq!(message["timestamp"], json!("2026-09-01T10:15:00.000Z"));
        let id = message["messageId"].as_str().unwrap();
        assert!(id.starts_with("imp-") && id.ends_with("-o-1"), "{id}");
    }

    #[test]
    fn message_ids_follow_the_row_key_not_the_other_cells() {
        let mapping = example("orders");
        let first = mapping.message_for(&source(), &order("10", "2026-09-01")).unwrap();
        let edited = mapping.message_for(&source(), &order("11", "2026-09-02")).unwrap();
        assert_eq!(first["messageId"], edited["messageId"], "same order id, same message");
        let other_source = mapping.message_for(&SourceId::new("src_other"), &order("10", "2026-09-01")).unwrap();
        assert_ne!(first["messageId"], other_source["messageId"]);

        let mut keyless = mapping.clone();
        keyless.row_key = None;
        let first = keyless.message_for(&source(), &order("10", "2026-09-01")).unwrap();
        let again = keyless.message_for(&source(), &order("10", "2026-09-01")).unwrap();
        let edited = keyless.message_for(&source(), &order("11", "2026-09-01")).unwrap();
        assert_eq!(first["messageId"], again["messageId"]);
        assert_ne!(first["messageId"], edited["messageId"], "without a key the content is the key");
    }

    #[test]
    fn message_ids_keep_legible_keys_and_hash_the_rest() {
        let source = source();
        let id = message_id_for(&source, EventType::Track, Some("Order Completed"), "ord-1");
        assert_eq!(id.len(), "imp-".len() + 16 + 1 + "ord-1".len());
        assert!(id.ends_with("-ord-1"));
        let composite = message_id_for(&source, EventType::Track, None, "t-1\u{1f}open");
        assert!(composite.ends_with("-t-1|open"), "{composite}");
        let piped = message_id_for(&source, EventType::Track, None, "t-1|open");
        assert_ne!(piped, composite, "a key with | is hashed, so it cannot pass for a composite key");
        let long = "x".repeat(200);
        let hashed = message_id_for(&source, EventType::Track, None, &long);
        assert!(hashed.len() <= crate::collect::MAX_MESSAGE_ID_CHARS);
        assert_ne!(hashed, message_id_for(&source, EventType::Track, None, &"y".repeat(200)));
        assert_ne!(id, message_id_for(&source, EventType::Track, Some("Order Refunded"), "ord-1"));
    }

    #[test]
    fn bad_cells_are_refused_with_their_column() {
        let mapping = example("orders");
        let error = mapping.message_for(&source(), &order("12,5x", "2026-09-01")).unwrap_err();
        assert_eq!(error.column.as_deref(), Some("total"));
        assert!(error.reason.contains("not a number"), "{}", error.reason);
        let error = mapping.message_for(&source(), &order("1", "yesterday")).unwrap_err();
        assert_eq!(error.column.as_deref(), Some("ordered_at"));
        assert!(error.reason.contains("timestamp"), "{}", error.reason);
        let error = mapping.message_for(&source(), &order("1", "")).unwrap_err();
        assert_eq!(error.reason, "timestamp ordered_at is empty");

        let nobody = Row(vec![("order_id", "o-2"), ("customer_id", " "), ("email", ""), ("ordered_at", "2026-09-01")]);
        let error = mapping.message_for(&source(), &nobody).unwrap_err();
        assert!(error.reason.starts_with("no identifier"), "{}", error.reason);
    }

    #[test]
    fn ticket_status_names_the_event_and_dates_follow_the_pattern() {
        let mapping = example("support_tickets");
        let ticket = |status: &'static str| {
            Row(vec![
                ("ticket_id", "t-1"),
                ("requester_id", "zd-7"),
                ("requester_email", "a@example.com"),
                ("status", status),
                ("updated_at", "03/10/2026 09:12"),
                ("csat", ""),
            ])
        };
        let opened = mapping.message_for(&source(), &ticket("open")).unwrap();
        let resolved = mapping.message_for(&source(), &ticket("resolved")).unwrap();
        assert_eq!(opened["event"], json!("Ticket Opened"));
        assert_eq!(resolved["event"], json!("Ticket Resolved"));
        assert_ne!(opened["messageId"], resolved["messageId"]);
        assert_eq!(opened["timestamp"], json!("2026-10-03T09:12:00.000Z"));
        assert_eq!(
            opened["context"]["externalIds"],
            json!([{"id": "zd-7", "type": "zendesk_id", "collection": "users", "encoding": "none"}])
        );
        let error = mapping.message_for(&source(), &ticket("pending")).unwrap_err();
        assert_eq!(error.column.as_deref(), Some("status"));
        assert!(error.reason.contains("not one of open, resolved"), "{}", error.reason);
    }

    #[test]
    fn contacts_become_identifies_with_traits_and_a_crm_id() {
        let row = Row(vec![
            ("contact_id", "c-1"),
            ("email", "ann@example.com"),
            ("phone", ""),
            ("first_name", "Ann"),
            ("opted_in", "yes"),
            ("updated_at", "2026-08-20"),
        ]);
        let message = example("crm_contacts").message_for(&source(), &row).unwrap();
        assert_eq!(message["type"], json!("identify"));
        assert!(message.get("userId").is_none());
        assert_eq!(message["traits"]["email"], json!("ann@example.com"));
        assert_eq!(message["traits"]["first_name"], json!("Ann"));
        assert_eq!(message["traits"]["newsletter"], json!(true));
        assert_eq!(message["context"]["externalIds"][0]["type"], json!("crm_id"));
    }

    #[test]
    fn json_records_are_read_by_dotted_paths_and_keep_their_types() {
        let Value::Object(record) = json!({
            "usage_id": "pu-1", "account": {"user_id": "u-1", "plan": "pro"}, "device": "mac",
            "feature": "reports", "used_at": 1_789_000_000, "duration_s": 45.5
        }) else {
            unreachable!()
        };
        let message = example("product_usage").message_for(&source(), &record).unwrap();
        assert_eq!(message["userId"], json!("u-1"));
        assert_eq!(message["context"]["device"]["id"], json!("mac"));
        assert_eq!(message["properties"]["plan"], json!("pro"));
        assert_eq!(message["properties"]["duration_seconds"], json!(45.5));
        assert_eq!(message["timestamp"], json!("2026-09-10T00:26:40.000Z"));
    }

    #[test]
    fn unusable_mappings_name_the_setting() {
        let error = |text: &str| Mapping::from_toml(text).unwrap_err();
        assert_eq!(error("type = \"track\"\n[identifiers]\nemail = \"e\"").field, "event");
        assert_eq!(error("type = \"alias\"\n[identifiers]\nemail = \"e\"").field, "type");
        assert_eq!(error("event = \"X\"").field, "identifiers");
        let bad_format = error(
            "event = \"X\"\ntimestamp = { column = \"t\", format = \"dd.mm.yyyy\" }\n[identifiers]\nemail = \"e\"",
        );
        assert_eq!(bad_format.field, "timestamp.format");
        let typo = error("event = \"X\"\n[identifiers]\nemail = \"e\"\n[propertes]\na = \"b\"");
        assert_eq!(typo.field, "line 4");
        assert!(typo.message.contains("propertes"), "{}", typo.message);
        let bad_number = error(
            "event = \"X\"\n[identifiers]\nemail = \"e\"\n[properties]\nn = { value = \"x\", type = \"number\" }",
        );
        assert_eq!(bad_number.field, "properties.n");
    }

    #[test]
    fn missing_columns_are_listed() {
        let mapping = example("orders");
        let header = ["order_id", "customer_id", "ordered_at", "total", "currency", "items", "coupon"];
        assert_eq!(mapping.missing_columns(&header), vec!["email"]);
    }
}
