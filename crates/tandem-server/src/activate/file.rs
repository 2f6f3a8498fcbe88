//! Writing to files: a file destination's `directory` mode turns each
//! delivered batch into **change files** (one per stream: `events`, or the
//! name of a followed audience) and each followed audience into full
//! **snapshot files** of its members with the chosen traits, in CSV, JSON
//! lines or Parquet. The original `path` mode appends JSON lines to one file.
//!
//! Every file in a directory is written whole under a hidden temporary name
//! in the same directory, flushed to disk, and only then renamed to its
//! final, timestamped name (`<stream>-changes-<UTC>.<ext>`,
//! `<audience>-snapshot-<UTC>.<ext>`) and the directory synced: a reader
//! that ignores dot-files never sees a partial file, whatever the moment of
//! a crash. A crash after the rename but before the outbox recorded the
//! delivery writes the batch again under a new name (at least once).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;
use tandem_core::activate::{AttemptFailure, AudienceSubscription, DestinationDefinition, FileFormat, FileSettings};
use tandem_store::{OutboxItem, Store};

/// The timestamp in file names: sorts as it reads, millisecond precision.
const STAMP_FORMAT: &str = "%Y%m%dT%H%M%S%.3fZ";

/// Members read per page when a snapshot is written.
const SNAPSHOT_PAGE: usize = 1_000;

/// The stream of a destination's events in file names.
pub const EVENTS_STREAM: &str = "events";

fn io_failure(error: impl std::fmt::Display) -> AttemptFailure {
    AttemptFailure::Io(error.to_string())
}

/// Rows under named columns; a value that is not a string is written as
/// JSON in CSV and Parquet, as itself in JSON lines; `null` is an empty cell.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Table {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Value>>,
}

fn cell_text(value: &Value) -> Option<String> {
    match value {
        Value::Null => None,
        Value::String(text) => Some(text.clone()),
        other => Some(other.to_string()),
    }
}

/// The table encoded in `format`.
pub fn encode(format: FileFormat, table: &Table) -> Result<Vec<u8>, AttemptFailure> {
    match format {
        FileFormat::Jsonl => {
            let mut out = Vec::new();
            for row in &table.rows {
                let object: serde_json::Map<String, Value> =
                    table.columns.iter().cloned().zip(row.iter().cloned()).collect();
                serde_json::to_writer(&mut out, &object).map_err(io_failure)?;
                out.push(b'\n');
            }
            Ok(out)
        }
        FileFormat::Csv => {
            let mut writer = csv::Writer::from_writer(Vec::new());
            writer.write_record(&table.columns).map_err(io_failure)?;
            for row in &table.rows {
                writer
                    .write_record(row.iter().map(|value| cell_text(value).unwrap_or_default()))
                    .map_err(io_failure)?;
            }
            writer.into_inner().map_err(io_failure)
        }
        FileFormat::Parquet => encode_parquet(table).map_err(io_failure),
    }
}

/// Parquet through the crate's column writers (no Arrow): every column an
/// optional UTF-8 `BYTE_ARRAY`, one row group per file, uncompressed.
fn encode_parquet(table: &Table) -> Result<Vec<u8>, parquet::errors::ParquetError> {
    use parquet::basic::{LogicalType, Repetition, Type as PhysicalType};
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::types::Type;

    let fields = table
        .columns
        .iter()
        .map(|name| {
            Type::primitive_type_builder(name, PhysicalType::BYTE_ARRAY)
                .with_repetition(Repetition::OPTIONAL)
                .with_logical_type(Some(LogicalType::String))
                .build()
                .map(Arc::new)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let schema = Arc::new(Type::group_type_builder("tandem").with_fields(fields).build()?);
    let mut out = Vec::new();
    let mut writer = SerializedFileWriter::new(&mut out, schema, Arc::new(WriterProperties::builder().build()))?;
    let mut group = writer.next_row_group()?;
    let mut column_index = 0;
    while let Some(mut column) = group.next_column()? {
        let cells: Vec<Option<String>> =
            table.rows.iter().map(|row| row.get(column_index).and_then(cell_text)).collect();
        let values: Vec<ByteArray> = cells.iter().flatten().map(|text| ByteArray::from(text.as_str())).collect();
        let levels: Vec<i16> = cells.iter().map(|cell| i16::from(cell.is_some())).collect();
        column.typed::<ByteArrayType>().write_batch(&values, Some(&levels), None)?;
        column.close()?;
        column_index += 1;
    }
    group.close()?;
    writer.close()?;
    Ok(out)
}

/// A name part made safe for a file name: lowercase letters, digits, `-`
/// and `_` kept, anything else a `-`.
pub fn file_stem(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c.to_ascii_lowercase() } else { '-' })
        .collect()
}

/// The file name stamp of an instant.
fn stamp(at_ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(at_ms).unwrap_or_default().format(STAMP_FORMAT).to_string()
}

/// Writes `bytes` to `directory/name` atomically; returns the final path.
/// When the name is taken (two files in one millisecond), `-2`, `-3`, …
/// goes before the extension.
pub fn write_atomically(directory: &Path, name: &str, bytes: &[u8]) -> std::io::Result<PathBuf> {
    write_atomically_with(directory, name, bytes, |_| Ok(()))
}

/// [`write_atomically`] with a step run between the durable temporary file
/// and the rename: the tests stop there to play a crash.
fn write_atomically_with(
    directory: &Path,
    name: &str,
    bytes: &[u8],
    before_rename: impl FnOnce(&Path) -> std::io::Result<()>,
) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(directory)?;
    let (stem, extension) = name.rsplit_once('.').unwrap_or((name, ""));
    let mut target = directory.join(name);
    let mut suffix = 2;
    while target.exists() {
        target = directory.join(format!("{stem}-{suffix}.{extension}"));
        suffix += 1;
    }
    let final_name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let temporary = directory.join(format!(".{final_name}.{}.tmp", std::process::id()));
    let written = (|| {
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        before_rename(&temporary)?;
        std::fs::rename(&temporary, &target)
    })();
    if let Err(error) = written {
        let _ = std::fs::remove_file(&temporary);
        return Err(error);
    }
    // The rename is durable once the directory entry is.
    std::fs::File::open(directory)?.sync_all()?;
    Ok(target)
}

/// The fixed columns of an audience change row.
const CHANGE_COLUMNS: [&str; 4] = ["audience", "change", "profile", "timestamp"];
/// The fixed columns of a snapshot row.
const SNAPSHOT_COLUMNS: [&str; 3] = ["audience", "profile", "entered_at"];
/// The columns of an event row; `event` holds the whole Segment JSON.
const EVENT_COLUMNS: [&str; 8] =
    ["position", "message_id", "type", "name", "user_id", "anonymous_id", "timestamp", "event"];

/// The columns of a table: the fixed ones, then one per chosen trait (a
/// trait named like a fixed column gets a `trait_` prefix).
fn columns(fixed: &[&str], traits: &[String]) -> Vec<String> {
    let mut columns: Vec<String> = fixed.iter().map(|c| (*c).to_owned()).collect();
    for name in traits {
        if fixed.contains(&name.as_str()) {
            columns.push(format!("trait_{name}"));
        } else {
            columns.push(name.clone());
        }
    }
    columns
}

fn event_row(item: &OutboxItem, event: &Value) -> Vec<Value> {
    let field = |name: &str| event.get(name).cloned().unwrap_or(Value::Null);
    let name = event.get("event").or_else(|| event.get("name")).cloned().unwrap_or(Value::Null);
    vec![
        Value::from(item.position.0),
        field("messageId"),
        field("type"),
        name,
        field("userId"),
        field("anonymousId"),
        field("timestamp"),
        event.clone(),
    ]
}

/// One batch of a directory-mode file destination: a change file per
/// stream in the batch, then the snapshots that are due.
pub fn deliver_batch(
    store: &dyn Store,
    definition: &DestinationDefinition,
    settings: &FileSettings,
    directory: &str,
    batch: &[OutboxItem],
    now_ms: i64,
) -> Result<(), AttemptFailure> {
    let format = settings.format.unwrap_or_default();
    let directory = Path::new(directory);
    let subscriptions: BTreeMap<&str, &AudienceSubscription> =
        definition.audiences.iter().map(|subscription| (subscription.name.as_str(), subscription)).collect();
    let mut events = Table { columns: columns(&EVENT_COLUMNS, &[]), rows: Vec::new() };
    let mut changes: BTreeMap<String, Table> = BTreeMap::new();
    for item in batch {
        let payload: Value = serde_json::from_str(&item.payload).map_err(io_failure)?;
        let audience = (payload.get("type").and_then(Value::as_str) == Some("audience"))
            .then(|| payload.get("audience").and_then(Value::as_str))
            .flatten();
        match audience {
            Some(audience) => {
                let traits = subscriptions.get(audience).map(|s| s.traits.as_slice()).unwrap_or_default();
                let table = changes
                    .entry(audience.to_owned())
                    .or_insert_with(|| Table { columns: columns(&CHANGE_COLUMNS, traits), rows: Vec::new() });
                let mut row: Vec<Value> =
                    CHANGE_COLUMNS.iter().map(|c| payload.get(*c).cloned().unwrap_or(Value::Null)).collect();
                row.extend(traits.iter().map(|name| payload["traits"].get(name).cloned().unwrap_or(Value::Null)));
                table.rows.push(row);
            }
            None => events.rows.push(event_row(item, &payload)),
        }
    }
    let extension = format.extension();
    let stamp = stamp(now_ms);
    if !events.rows.is_empty() {
        let name = format!("{EVENTS_STREAM}-changes-{stamp}.{extension}");
        write_atomically(directory, &name, &encode(format, &events)?).map_err(io_failure)?;
    }
    for (audience, table) in &changes {
        let name = format!("{}-changes-{stamp}.{extension}", file_stem(audience));
        write_atomically(directory, &name, &encode(format, table)?).map_err(io_failure)?;
    }
    for subscription in &definition.audiences {
        let changed = changes.contains_key(&subscription.name);
        let due = match settings.snapshot_every_ms() {
            // Without a cadence, a snapshot goes with every batch that
            // changes the audience.
            None => changed,
            Some(every) => last_snapshot_ms(directory, &subscription.name, format)
                .is_none_or(|last| now_ms.saturating_sub(last) >= every as i64),
        };
        if due {
            write_snapshot(store, subscription, format, directory, now_ms)?;
        }
    }
    Ok(())
}

/// What [`write_owed_snapshots`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OwedSnapshots {
    /// Snapshot files written.
    pub written: usize,
    /// When the next one falls due if nothing changes (with
    /// `snapshot_every`); `None` when only a change brings the next.
    pub next_due_ms: Option<i64>,
}

/// The snapshots a directory-mode destination owes while its outbox is
/// empty, when no batch brings them: one for each followed audience that
/// has none in the directory yet (a new destination, or one following an
/// audience nothing has changed since), and with `snapshot_every` one for
/// each whose newest is that old, so the directory holds a current
/// snapshot even when no member came or went.
pub fn write_owed_snapshots(
    store: &dyn Store,
    definition: &DestinationDefinition,
    settings: &FileSettings,
    directory: &str,
    now_ms: i64,
) -> Result<OwedSnapshots, AttemptFailure> {
    let format = settings.format.unwrap_or_default();
    let directory = Path::new(directory);
    let every = settings.snapshot_every_ms().map(|every| every as i64);
    let mut owed = OwedSnapshots { written: 0, next_due_ms: None };
    for subscription in &definition.audiences {
        let last = last_snapshot_ms(directory, &subscription.name, format);
        let due_at = match (last, every) {
            (None, _) => now_ms,
            (Some(last), Some(every)) => last.saturating_add(every),
            (Some(_), None) => continue,
        };
        let next_due_ms = if due_at <= now_ms {
            write_snapshot(store, subscription, format, directory, now_ms)?;
            owed.written += 1;
            match every {
                Some(every) => now_ms.saturating_add(every),
                None => continue,
            }
        } else {
            due_at
        };
        owed.next_due_ms = Some(owed.next_due_ms.map_or(next_due_ms, |soonest| soonest.min(next_due_ms)));
    }
    Ok(owed)
}

/// Writes one snapshot file of the audience, stamped `now_ms`.
fn write_snapshot(
    store: &dyn Store,
    subscription: &AudienceSubscription,
    format: FileFormat,
    directory: &Path,
    now_ms: i64,
) -> Result<PathBuf, AttemptFailure> {
    let table = snapshot(store, subscription)?;
    let name = format!("{}-snapshot-{}.{}", file_stem(&subscription.name), stamp(now_ms), format.extension());
    write_atomically(directory, &name, &encode(format, &table)?).map_err(io_failure)
}

/// The instant of an audience's latest snapshot file, from its name.
fn last_snapshot_ms(directory: &Path, audience: &str, format: FileFormat) -> Option<i64> {
    let prefix = format!("{}-snapshot-", file_stem(audience));
    let suffix = format!(".{}", format.extension());
    std::fs::read_dir(directory)
        .ok()?
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter_map(|name| {
            let stamp = name.strip_prefix(&prefix)?.strip_suffix(&suffix)?;
            // A `-2` after the stamp marks a second file in one millisecond.
            let stamp = stamp.split('-').next()?;
            let at = chrono::NaiveDateTime::parse_from_str(stamp, STAMP_FORMAT).ok()?;
            Some(at.and_utc().timestamp_millis())
        })
        .max()
}

/// Every member of the audience now, by profile id, with the chosen traits.
pub fn snapshot(store: &dyn Store, subscription: &AudienceSubscription) -> Result<Table, AttemptFailure> {
    let storage = |error: tandem_store::StoreError| AttemptFailure::Io(format!("reading the audience: {error}"));
    let mut table = Table { columns: columns(&SNAPSHOT_COLUMNS, &subscription.traits), rows: Vec::new() };
    let mut after = None;
    loop {
        let members = store.audience_members(&subscription.name, after, SNAPSHOT_PAGE).map_err(storage)?;
        let Some(last) = members.last() else { break };
        after = Some(last.profile);
        let ids: Vec<_> = members.iter().map(|member| member.profile).collect();
        let traits: BTreeMap<_, _> =
            store.profiles(&ids).map_err(storage)?.into_iter().map(|profile| (profile.id, profile.traits)).collect();
        for member in &members {
            let entered = chrono::DateTime::from_timestamp_millis(member.entered_at_ms)
                .map(tandem_core::event::format_timestamp)
                .unwrap_or_default();
            let mut row = vec![
                Value::from(subscription.name.clone()),
                Value::from(member.profile.to_string()),
                Value::from(entered),
            ];
            let profile_traits = traits.get(&member.profile);
            row.extend(
                subscription
                    .traits
                    .iter()
                    .map(|name| profile_traits.and_then(|t| t.get(name)).cloned().unwrap_or(Value::Null)),
            );
            table.rows.push(row);
        }
        if members.len() < SNAPSHOT_PAGE {
            break;
        }
    }
    Ok(table)
}

/// The original mode: each item appended as one line of JSON to `path`,
/// fsynced per batch.
pub fn append_lines(path: &str, batch: &[OutboxItem]) -> Result<(), AttemptFailure> {
    let mut lines = String::new();
    for item in batch {
        // The stored payload is one JSON object; a line break inside it is
        // impossible (JSON escapes it), so each item is exactly one line.
        lines.push_str(&item.payload);
        lines.push('\n');
    }
    let mut handle = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(io_failure)?;
    handle.write_all(lines.as_bytes()).map_err(io_failure)?;
    handle.sync_data().map_err(io_failure)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn table() -> Table {
        Table {
            columns: vec!["profile".into(), "email".into(), "age".into()],
            rows: vec![
                vec![Value::from("prof_1"), Value::from("ann@example.com, \"quoted\""), Value::from(40)],
                vec![Value::from("prof_2"), Value::Null, serde_json::json!({"a": 1})],
            ],
        }
    }

    #[test]
    fn csv_round_trips_through_the_csv_reader() {
        let bytes = encode(FileFormat::Csv, &table()).unwrap();
        let mut reader = csv::Reader::from_reader(bytes.as_slice());
        assert_eq!(reader.headers().unwrap(), vec!["profile", "email", "age"]);
        let rows: Vec<Vec<String>> = reader.records().map(|r| r.unwrap().iter().map(str::to_owned).collect()).collect();
        assert_eq!(rows[0], vec!["prof_1", "ann@example.com, \"quoted\"", "40"]);
        assert_eq!(rows[1], vec!["prof_2", "", r#"{"a":1}"#]);
    }

    #[test]
    fn parquet_round_trips_through_the_parquet_reader() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_atomically(dir.path(), "t.parquet", &encode(FileFormat::Parquet, &table()).unwrap()).unwrap();
        let rows = read_parquet(&path);
        assert_eq!(
            rows,
            vec![
                vec![Some("prof_1".to_owned()), Some("ann@example.com, \"quoted\"".to_owned()), Some("40".to_owned())],
                vec![Some("prof_2".to_owned()), None, Some(r#"{"a":1}"#.to_owned())],
            ]
        );
    }

    /// Every row of a Parquet file as optional strings, via the crate's reader.
    pub(crate) fn read_parquet(path: &Path) -> Vec<Vec<Option<String>>> {
        use parquet::file::reader::{FileReader, SerializedFileReader};
        use parquet::record::Field;
        let reader = SerializedFileReader::new(std::fs::File::open(path).unwrap()).unwrap();
        reader
            .get_row_iter(None)
            .unwrap()
            .map(|row| {
                row.unwrap()
                    .get_column_iter()
                    .map(|(_, field)| match field {
                        Field::Str(text) => Some(text.clone()),
                        Field::Null => None,
                        other => panic!("unexpected field {other:?}"),
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn jsonl_keeps_values_as_json() {
        let bytes = encode(FileFormat::Jsonl, &table()).unwrap();
        let lines: Vec<Value> =
            String::from_utf8(bytes).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines[0]["age"], 40);
        assert_eq!(lines[1]["email"], Value::Null);
        assert_eq!(lines[1]["age"]["a"], 1);
    }

    #[test]
    fn a_crash_before_the_rename_leaves_no_file_under_the_final_name() {
        let dir = tempfile::tempdir().unwrap();
        let crashed = write_atomically_with(dir.path(), "pro-changes-x.csv", b"a,b\n1,2\n", |temporary| {
            // The temporary file is complete and durable at this point…
            assert_eq!(std::fs::read(temporary).unwrap(), b"a,b\n1,2\n");
            // …and the process dies before the rename.
            Err(std::io::Error::other("crash"))
        });
        assert!(crashed.is_err());
        assert!(!dir.path().join("pro-changes-x.csv").exists(), "no partial file under the final name");
        let visible: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|name| !name.starts_with('.'))
            .collect();
        assert!(visible.is_empty(), "{visible:?}");

        let first = write_atomically(dir.path(), "pro-changes-x.csv", b"one").unwrap();
        let second = write_atomically(dir.path(), "pro-changes-x.csv", b"two").unwrap();
        assert_eq!(first.file_name().unwrap(), "pro-changes-x.csv");
        assert_eq!(second.file_name().unwrap(), "pro-changes-x-2.csv", "a taken name is never overwritten");
        assert_eq!(std::fs::read(first).unwrap(), b"one");
    }

    #[test]
    fn file_names_are_safe_and_sort_by_time() {
        assert_eq!(file_stem("Active Pro/EU"), "active-pro-eu");
        assert_eq!(stamp(1_700_000_000_123), "20231114T221320.123Z");
        assert!(stamp(1_700_000_000_123) < stamp(1_700_000_001_000));
    }
}
