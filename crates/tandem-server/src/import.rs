//! Bulk import: a silo's export (CSV or JSON Lines, optionally gzipped) read
//! row by row, each row turned into a message by its [`Mapping`], validated
//! like any tracking call, and appended to the log in large batches. Rows that
//! do not fit go to a reject file with their line and reason and the import
//! goes on; a file that cannot be read as its format stops at the line at
//! fault. The same runner serves `tandem import` (writing to the store
//! directly) and `POST /api/v1/imports` (writing through the log writer).
//! Every mapped row passes the same governance as a tracking call
//! ([`Gate`]): a row carrying a suppressed identifier, a red value the PII
//! rules refuse, or blocked by the source's tracking plan goes to the
//! quarantine (and to the reject file, without its record), and plan
//! violations are counted with the rows' append.
//!
//! Reading and mapping run on their own thread while the caller's thread
//! appends the previous batch, so parsing and committing overlap.

pub mod bounds;
pub mod jobs;

use crate::govern::Gate;
use crate::log_writer::LogWriter;
use bounds::{
    truncated, CountingReader, ExpansionBound, RowBound, RowSyntax, MAX_ECHOED_FIELD_BYTES, MAX_REASON_CHARS,
    MAX_ROW_BYTES,
};
use chrono::Utc;
use serde::Serialize;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_core::collect::{normalize_message, BatchDefaults, IdRequirement, RejectedMessage, RequestContext};
use tandem_core::govern::{PiiClass, PiiPolicy};
use tandem_core::mapping::{Cell, Mapping, Record, RowError};
use tandem_core::{LogRecord, Source};
use tandem_store::{Dedup, IngestBatch, IngestOutcome, PlanViolationRecord, QuarantineRecord, Store};

/// Rows per append: large enough that a commit's fsync is shared by many
/// rows, small enough to keep memory flat and progress lively.
pub const ROWS_PER_BATCH: usize = 10_000;
/// Reject lines kept in memory for an import job's status.
const REJECTS_SHOWN: usize = 100;

/// The formats a silo's export may come in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
#[schema(as = ImportFileFormat)]
pub enum FileFormat {
    Csv,
    Jsonl,
}

impl FileFormat {
    /// The format a file name says (`orders.csv`, `usage.jsonl.gz`).
    pub fn from_path(path: &Path) -> Option<FileFormat> {
        let name = path.file_name()?.to_str()?.to_ascii_lowercase();
        let name = name.strip_suffix(".gz").unwrap_or(&name);
        FileFormat::parse(name.rsplit_once('.')?.1)
    }

    /// The format a name (`csv`, `jsonl`, `ndjson`, `json`) says.
    pub fn parse(name: &str) -> Option<FileFormat> {
        match name.to_ascii_lowercase().as_str() {
            "csv" => Some(FileFormat::Csv),
            "jsonl" | "ndjson" | "json" => Some(FileFormat::Jsonl),
            _ => None,
        }
    }

    fn reject_extension(self) -> &'static str {
        match self {
            FileFormat::Csv => "rejects.csv",
            FileFormat::Jsonl => "rejects.jsonl",
        }
    }
}

/// Why an import stopped before the end of its file.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot read {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("line {line}: {message}")]
    Malformed { line: u64, message: String },
    #[error("the mapping names columns the file does not have: {}", .0.join(", "))]
    MissingColumns(Vec<String>),
    #[error("cannot write the reject file {path}: {source}")]
    Rejects { path: PathBuf, source: std::io::Error },
    #[error("the log refused the rows: {0}")]
    Append(String),
    #[error("stopped at line {line} because the server is shutting down; import the file again to finish (rows already imported are recognized and stored once)")]
    Stopped { line: u64 },
}

/// Counts of an import so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ImportCounts {
    pub rows_read: u64,
    /// Rows newly stored in the log.
    pub imported: u64,
    /// Rows whose message the log already held (an earlier import of them).
    pub duplicates: u64,
    pub rejected: u64,
    /// Of the rejected rows, those governance refused (a suppressed
    /// person, a red value the PII rules refuse, the tracking plan): they are
    /// in the quarantine too.
    pub quarantined: u64,
    /// Bytes of the file read, before decompression.
    pub bytes_read: u64,
}

/// One refused row, as written to the reject file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RejectedRow {
    pub line: u64,
    pub column: Option<String>,
    pub reason: String,
}

/// Where an import's rows go: the store directly, or the server's log writer.
pub trait RowSink {
    fn append(&mut self, batch: IngestBatch) -> Result<IngestOutcome, String>;
}

impl<F: FnMut(IngestBatch) -> Result<IngestOutcome, String>> RowSink for F {
    fn append(&mut self, batch: IngestBatch) -> Result<IngestOutcome, String> {
        self(batch)
    }
}

/// Straight to a store, as `tandem import` writes beside (or without) a
/// server, hashing red values by the PII rules given (those in force: see
/// [`crate::pii::policy_in_force`]).
pub struct StoreSink<'a, S: Store + ?Sized> {
    pub store: &'a S,
    pub pii: &'a tandem_core::govern::PiiPolicy,
}

impl<S: Store + ?Sized> RowSink for StoreSink<'_, S> {
    fn append(&mut self, mut batch: IngestBatch) -> Result<IngestOutcome, String> {
        crate::pii::scrub_batch(self.pii, &mut batch);
        let dedup_since_ms =
            Utc::now().timestamp_millis() - i64::try_from(crate::DEFAULT_DEDUP_WINDOW.as_millis()).unwrap_or(i64::MAX);
        self.store.append(&[batch], dedup_since_ms).map(|outcomes| outcomes[0]).map_err(|error| error.to_string())
    }
}

/// Through the server's log writer, from a blocking thread of its runtime
/// (imports run on `spawn_blocking`), so imported rows share its group commits.
impl RowSink for LogWriter {
    fn append(&mut self, batch: IngestBatch) -> Result<IngestOutcome, String> {
        tokio::runtime::Handle::current().block_on(LogWriter::append(self, batch)).map_err(|error| error.to_string())
    }
}

/// What an import is asked to do.
pub struct ImportRequest<'a> {
    pub source: &'a Source,
    pub mapping: &'a Mapping,
    pub format: FileFormat,
    /// The file; gzip is recognized by its first bytes.
    pub input: Box<dyn Read + Send + 'a>,
    /// Where refused rows are written; created only if a row is refused.
    pub reject_path: PathBuf,
    /// What every mapped row is checked against (read once per import).
    pub gate: &'a Gate,
}

/// The reject file beside an input: `orders.csv` → `orders.csv.rejects.csv`.
pub fn reject_path_beside(input: &Path, format: FileFormat) -> PathBuf {
    let mut name = input.file_name().map(|name| name.to_os_string()).unwrap_or_default();
    name.push(".");
    name.push(format.reject_extension());
    input.with_file_name(name)
}

/// What an import did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ImportSummary {
    pub counts: ImportCounts,
    /// The reject file, when a row was refused.
    pub reject_file: Option<PathBuf>,
    /// The first refused rows.
    pub first_rejects: Vec<RejectedRow>,
    #[serde(serialize_with = "seconds")]
    pub elapsed: Duration,
}

fn seconds<S: serde::Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64(duration.as_secs_f64())
}

/// A batch of mapped rows on its way from the reader thread to the sink.
struct Chunk {
    records: Vec<LogRecord>,
    rejects: Vec<(RejectedRow, RawRow)>,
    /// Rows governance refused, for the quarantine.
    quarantine: Vec<QuarantineRecord>,
    /// Tracking-plan violations, counted with the append.
    violations: Vec<PlanViolationRecord>,
    rows_read: u64,
}

impl Chunk {
    fn empty() -> Chunk {
        Chunk {
            records: Vec::with_capacity(ROWS_PER_BATCH),
            rejects: Vec::new(),
            quarantine: Vec::new(),
            violations: Vec::new(),
            rows_read: 0,
        }
    }

    /// Keeps what became of a mapped row at `line`: an event, a row
    /// governance refused (quarantined, and listed in the reject file without
    /// its record, which the quarantine keeps with red values hashed), or a
    /// row that did not map (`echoed` as it was in the file).
    fn keep(&mut self, line: u64, mapped: Result<Mapped, RowError>, mapper: &RowMapper<'_>, echoed: RawRow) {
        match mapped {
            Ok(Mapped::Event(record)) => self.records.push(record),
            Ok(Mapped::Refused(refused)) => {
                let withheld = match echoed {
                    RawRow::Fields(_) => RawRow::Fields(Vec::new()),
                    RawRow::Line(_) => RawRow::Line(String::new()),
                };
                self.rejects.push((
                    RejectedRow {
                        line,
                        column: refused.rejection.field.clone(),
                        reason: truncated(&refused.rejection.message, MAX_REASON_CHARS).into(),
                    },
                    withheld,
                ));
                self.quarantine.push(crate::collect::quarantine_record(
                    mapper.source,
                    mapper.received_at.timestamp_millis(),
                    &refused,
                ));
            }
            Err(error) => self.rejects.push((
                RejectedRow { line, column: error.column, reason: truncated(&error.reason, MAX_REASON_CHARS).into() },
                echoed,
            )),
        }
    }

    /// Sends the chunk once it holds a batch's rows; `false` when nobody
    /// listens any more (the import stopped).
    fn send_when_full(&mut self, sender: &Sender) -> bool {
        if (self.rows_read as usize) < ROWS_PER_BATCH {
            return true;
        }
        sender.send(Ok(std::mem::replace(self, Chunk::empty()))).is_ok()
    }

    fn send_rest(self, sender: &Sender) {
        if self.rows_read > 0 {
            let _ = sender.send(Ok(self));
        }
    }
}

/// A refused row as it was in the file, for the reject file.
enum RawRow {
    /// A CSV row's fields.
    Fields(Vec<String>),
    /// A JSON Lines line.
    Line(String),
}

/// Runs one import to the end of its file. `progress` is called after every
/// batch with the counts so far.
pub fn run_import(
    request: ImportRequest<'_>,
    sink: &mut dyn RowSink,
    progress: &mut dyn FnMut(&ImportCounts),
) -> Result<ImportSummary, ImportError> {
    run_import_until(request, sink, progress, &AtomicBool::new(false))
}

/// [`run_import`], stopping with [`ImportError::Stopped`] within a row of
/// `stop` being set (the server shutting down). Rows appended before the stop
/// stay; importing the file again stores only the rest, as every row's
/// message id is derived from the row and kept for good.
pub fn run_import_until(
    request: ImportRequest<'_>,
    sink: &mut dyn RowSink,
    progress: &mut dyn FnMut(&ImportCounts),
    stop: &AtomicBool,
) -> Result<ImportSummary, ImportError> {
    let started = Instant::now();
    let bytes_read = Arc::new(AtomicU64::new(0));
    let input = decompressed(CountingReader { inner: request.input, count: bytes_read.clone() }, bytes_read.clone());

    let ImportRequest { source, mapping, format, reject_path, gate, .. } = request;
    let mut counts = ImportCounts::default();
    let mut rejects = RejectFile::new(reject_path);
    let mut first_rejects = Vec::new();
    let (sender, receiver) = mpsc::sync_channel::<Result<Chunk, ImportError>>(2);

    std::thread::scope(|scope| {
        let reader = std::thread::Builder::new()
            .name("tandem-import-reader".into())
            .spawn_scoped(scope, move || {
                let received_at = Utc::now();
                let mapper = RowMapper { source, mapping, received_at, stop, gate };
                let result = match format {
                    FileFormat::Csv => read_csv(input, &mapper, &sender),
                    FileFormat::Jsonl => read_jsonl(input, &mapper, &sender),
                };
                if let Err(error) = result {
                    let _ = sender.send(Err(error));
                }
            })
            .expect("spawning the import reader thread");

        let mut outcome = Ok(());
        for chunk in &receiver {
            let chunk = match chunk {
                Ok(chunk) => chunk,
                Err(error) => {
                    outcome = Err(error);
                    break;
                }
            };
            counts.rows_read += chunk.rows_read;
            counts.rejected += chunk.rejects.len() as u64;
            counts.quarantined += chunk.quarantine.len() as u64;
            for (row, raw) in chunk.rejects {
                if let Err(error) = rejects.write(&row, raw) {
                    outcome = Err(error);
                    break;
                }
                if first_rejects.len() < REJECTS_SHOWN {
                    first_rejects.push(row);
                }
            }
            if outcome.is_err() {
                break;
            }
            if !(chunk.records.is_empty() && chunk.quarantine.is_empty() && chunk.violations.is_empty()) {
                let batch = IngestBatch {
                    records: chunk.records,
                    rejected: chunk.quarantine,
                    dedup: Dedup::Forever,
                    violations: chunk.violations,
                };
                match sink.append(batch) {
                    Ok(appended) => {
                        counts.imported += u64::from(appended.stored);
                        counts.duplicates += u64::from(appended.duplicates);
                    }
                    Err(message) => {
                        outcome = Err(ImportError::Append(message));
                        break;
                    }
                }
            }
            counts.bytes_read = bytes_read.load(Ordering::Relaxed);
            progress(&counts);
        }
        // Dropping the receiver stops a reader still sending.
        drop(receiver);
        reader.join().expect("the import reader panicked");
        outcome
    })?;
    let reject_file = rejects.finish()?;
    Ok(ImportSummary { counts, reject_file, first_rejects, elapsed: started.elapsed() })
}

/// The file as text: gunzipped when its first bytes say gzip, within the
/// expansion bound measured against `compressed`, the bytes `input` has
/// read so far.
fn decompressed<'a>(input: impl Read + Send + 'a, compressed: Arc<AtomicU64>) -> Box<dyn BufRead + Send + 'a> {
    let mut buffered = BufReader::with_capacity(256 * 1024, input);
    let gzipped = buffered.fill_buf().map(|start| start.starts_with(&[0x1f, 0x8b])).unwrap_or(false);
    if gzipped {
        let decoder = flate2::read::MultiGzDecoder::new(buffered);
        Box::new(BufReader::with_capacity(256 * 1024, ExpansionBound { inner: decoder, compressed, decompressed: 0 }))
    } else {
        Box::new(buffered)
    }
}

/// Checks the start of a file against its mapping without importing
/// anything: a CSV header lacking a mapped column, or a JSON Lines file whose
/// first record is not a JSON object with the mapped columns. Lets an upload
/// be refused at once instead of failing as a job.
pub fn preflight(input: impl Read + Send, format: FileFormat, mapping: &Mapping) -> Result<(), ImportError> {
    let compressed = Arc::new(AtomicU64::new(0));
    let input = decompressed(CountingReader { inner: input, count: compressed.clone() }, compressed);
    match format {
        FileFormat::Csv => {
            let mut reader =
                csv::ReaderBuilder::new().has_headers(true).from_reader(RowBound::new(input, RowSyntax::Csv));
            checked_header(&mut reader, mapping).map(drop)
        }
        FileFormat::Jsonl => {
            let mut input = BufReader::new(RowBound::new(input, RowSyntax::Lines));
            let mut line = String::new();
            let mut number = 0;
            loop {
                number += 1;
                line.clear();
                let read = input.read_line(&mut line).map_err(|_| ImportError::Malformed {
                    line: number,
                    message: "the line is not valid UTF-8".into(),
                })?;
                if read == 0 {
                    return Ok(());
                }
                if line.trim().is_empty() {
                    continue;
                }
                return match serde_json::from_str::<Value>(line.trim()) {
                    Ok(Value::Object(object)) => check_first_object(mapping, &object, number),
                    Ok(_) => {
                        Err(ImportError::Malformed { line: number, message: "the line is not a JSON object".into() })
                    }
                    Err(error) => Err(ImportError::Malformed {
                        line: number,
                        message: format!("the line is not valid JSON: {error}"),
                    }),
                };
            }
        }
    }
}

/// Turns records into log records with the import's fixed context.
struct RowMapper<'a> {
    source: &'a Source,
    mapping: &'a Mapping,
    received_at: chrono::DateTime<Utc>,
    stop: &'a AtomicBool,
    gate: &'a Gate,
}

/// A row that mapped to a valid event, after governance.
enum Mapped {
    Event(LogRecord),
    Refused(RejectedMessage),
}

impl RowMapper<'_> {
    fn check_stop(&self, line: u64) -> Result<(), ImportError> {
        if self.stop.load(Ordering::Relaxed) {
            Err(ImportError::Stopped { line })
        } else {
            Ok(())
        }
    }

    /// The row at `line` as an event, through governance; violations found
    /// are added to `violations`.
    fn map(
        &self,
        record: &dyn Record,
        line: u64,
        violations: &mut Vec<PlanViolationRecord>,
    ) -> Result<Mapped, RowError> {
        let message = self.mapping.message_for(&self.source.id, record)?;
        let request = RequestContext {
            source_id: &self.source.id,
            received_at: self.received_at,
            client_ip: None,
            ids: IdRequirement::Mapped,
        };
        let event = normalize_message(message, None, &BatchDefaults::default(), &request)
            .map_err(|rejection| RowError { column: rejection.field, reason: rejection.message })?;
        // A row has no message as sent: the event it became stands in for
        // it, serialized before governance may change it, and only when
        // governance has anything to check.
        let sent = if self.gate.inspects() { serde_json::to_string(&event).unwrap_or_default() } else { String::new() };
        let index = usize::try_from(line).ok();
        let checked = self.gate.check(event, index, &|| sent.clone(), self.received_at.timestamp_millis(), violations);
        match checked {
            Ok(event) => Ok(Mapped::Event(event.to_log_record())),
            Err(refused) => Ok(Mapped::Refused(refused)),
        }
    }
}

/// A CSV row, its cells found by the header's column positions.
struct CsvRow<'a> {
    columns: &'a HashMap<String, usize>,
    record: &'a csv::StringRecord,
}

impl Record for CsvRow<'_> {
    fn cell(&self, column: &str) -> Option<Cell<'_>> {
        self.columns.get(column).and_then(|index| self.record.get(*index)).map(Cell::Text)
    }

    fn content(&self) -> String {
        self.record.iter().collect::<Vec<_>>().join("\u{1f}")
    }
}

type Sender = mpsc::SyncSender<Result<Chunk, ImportError>>;

fn read_csv(input: Box<dyn BufRead + Send + '_>, mapper: &RowMapper<'_>, sender: &Sender) -> Result<(), ImportError> {
    let bounded = RowBound::new(input, RowSyntax::Csv);
    let cuts = bounded.cuts();
    // Flexible, because a cut row is short; the field count is checked below.
    let mut reader = csv::ReaderBuilder::new().has_headers(true).flexible(true).from_reader(bounded);
    let header = checked_header(&mut reader, mapper.mapping)?;
    let names: Vec<&str> = header.iter().map(str::trim).collect();
    let columns: HashMap<String, usize> =
        names.iter().enumerate().rev().map(|(index, name)| ((*name).to_owned(), index)).collect();
    let mut chunk = Chunk::empty();
    // One buffer, moved between its byte and text forms, so rows are not allocated anew.
    let mut bytes = csv::ByteRecord::new();
    loop {
        match reader.read_byte_record(&mut bytes) {
            Ok(false) => break,
            Ok(true) => {}
            Err(error) => return Err(csv_error(&error, reader.position().line())),
        }
        let line = bytes.position().map_or(0, csv::Position::line);
        mapper.check_stop(line)?;
        let start = bytes.position().map_or(0, csv::Position::byte);
        if cuts.cut_within(start, reader.position().byte()) {
            chunk.rows_read += 1;
            let fields = bytes.iter().enumerate().map(|(index, field)| {
                echo_field(&mapper.gate.pii, names.get(index).copied(), &String::from_utf8_lossy(field))
            });
            chunk.rejects.push((too_long(line), RawRow::Fields(fields.collect())));
            if !chunk.send_when_full(sender) {
                return Ok(());
            }
            continue;
        }
        if bytes.len() != header.len() {
            return Err(ImportError::Malformed {
                line,
                message: format!(
                    "the row has {} fields but the header has {} (is a quote left open on this or an earlier line?)",
                    bytes.len(),
                    header.len()
                ),
            });
        }
        let record = csv::StringRecord::from_byte_record(std::mem::take(&mut bytes)).map_err(|error| {
            let column = error.utf8_error().field();
            let name = names.get(column).copied().unwrap_or("?");
            ImportError::Malformed { line, message: format!("column {name} is not valid UTF-8") }
        })?;
        chunk.rows_read += 1;
        let mapped = mapper.map(&CsvRow { columns: &columns, record: &record }, line, &mut chunk.violations);
        let echoed = if mapped.is_err() {
            let fields = record
                .iter()
                .enumerate()
                .map(|(index, field)| echo_field(&mapper.gate.pii, names.get(index).copied(), field));
            RawRow::Fields(fields.collect())
        } else {
            RawRow::Fields(Vec::new())
        };
        chunk.keep(line, mapped, mapper, echoed);
        bytes = record.into_byte_record();
        if !chunk.send_when_full(sender) {
            return Ok(());
        }
    }
    chunk.send_rest(sender);
    Ok(())
}

/// The CSV header, once it is known to hold every column the mapping reads.
fn checked_header<R: Read>(reader: &mut csv::Reader<R>, mapping: &Mapping) -> Result<csv::StringRecord, ImportError> {
    let header = reader.headers().map_err(|error| csv_error(&error, 1))?.clone();
    let names: Vec<&str> = header.iter().map(str::trim).collect();
    let missing = mapping.missing_columns(&names);
    if missing.is_empty() {
        Ok(header)
    } else {
        Err(ImportError::MissingColumns(missing.into_iter().map(str::to_owned).collect()))
    }
}

fn csv_error(error: &csv::Error, fallback_line: u64) -> ImportError {
    let line = error.position().map_or(fallback_line, csv::Position::line);
    let message = match error.kind() {
        csv::ErrorKind::UnequalLengths { expected_len, len, .. } => format!(
            "the row has {len} fields but the header has {expected_len} (is a quote left open on this or an earlier line?)"
        ),
        csv::ErrorKind::Utf8 { err, .. } => format!("field {} is not valid UTF-8", err.field() + 1),
        csv::ErrorKind::Io(error) => format!("the file could not be read: {error}"),
        _ => error.to_string(),
    };
    ImportError::Malformed { line, message }
}

fn read_jsonl(input: Box<dyn BufRead + Send + '_>, mapper: &RowMapper<'_>, sender: &Sender) -> Result<(), ImportError> {
    let bounded = RowBound::new(input, RowSyntax::Lines);
    let cuts = bounded.cuts();
    let mut input = BufReader::with_capacity(256 * 1024, bounded);
    let mut chunk = Chunk::empty();
    let mut raw = Vec::new();
    let mut line = 0u64;
    let mut offset = 0u64;
    let mut checked_columns = false;
    loop {
        raw.clear();
        let read = input.read_until(b'\n', &mut raw).map_err(|error| ImportError::Malformed {
            line: line + 1,
            message: format!("the file could not be read: {error}"),
        })?;
        if read == 0 {
            break;
        }
        line += 1;
        mapper.check_stop(line)?;
        let start = offset;
        offset += read as u64;
        if cuts.cut_within(start, offset) {
            chunk.rows_read += 1;
            let start = echo_line(&mapper.gate.pii, &String::from_utf8_lossy(&raw));
            chunk.rejects.push((too_long(line), RawRow::Line(start)));
            if !chunk.send_when_full(sender) {
                return Ok(());
            }
            continue;
        }
        let text = std::str::from_utf8(&raw)
            .map_err(|_| ImportError::Malformed { line, message: "the line is not valid UTF-8".into() })?
            .trim();
        if text.is_empty() {
            continue;
        }
        chunk.rows_read += 1;
        let mapped = match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(object)) => {
                if !checked_columns {
                    check_first_object(mapper.mapping, &object, line)?;
                    checked_columns = true;
                }
                mapper.map(&object, line, &mut chunk.violations)
            }
            Ok(_) => Err(RowError::new(None, "the line is not a JSON object")),
            Err(error) => Err(RowError::new(None, format!("the line is not valid JSON: {error}"))),
        };
        let echoed =
            if mapped.is_err() { RawRow::Line(echo_line(&mapper.gate.pii, text)) } else { RawRow::Line(String::new()) };
        chunk.keep(line, mapped, mapper, echoed);
        if !chunk.send_when_full(sender) {
            return Ok(());
        }
    }
    chunk.send_rest(sender);
    Ok(())
}

/// The refusal of a row longer than [`MAX_ROW_BYTES`].
fn too_long(line: u64) -> RejectedRow {
    RejectedRow {
        line,
        column: None,
        reason: format!("the row is longer than the limit of {MAX_ROW_BYTES} bytes; its start is shown"),
    }
}

/// A refused field as a reject file shows it: whole up to
/// [`MAX_ECHOED_FIELD_BYTES`], so the usual reject can be fixed and imported
/// again, and cut beyond (no such field fits in a message anyway).
fn echo(field: &str) -> String {
    truncated(field, MAX_ECHOED_FIELD_BYTES).into_owned()
}

/// A refused CSV field under `column` as the reject file shows it: a red
/// value (by its column's class, or a card number anywhere) is replaced by
/// its hash, as ingestion would store it, so the reject file never holds one
/// in clear.
fn echo_field(pii: &PiiPolicy, column: Option<&str>, field: &str) -> String {
    let value = Value::String(field.to_owned());
    if pii.classify(column.unwrap_or(""), &value) == PiiClass::Red {
        match pii.hash(&value) {
            Value::String(hash) => hash,
            other => other.to_string(),
        }
    } else {
        echo(field)
    }
}

/// A refused JSON line as the reject file shows it: red values hashed under
/// any key at any depth (a line that is not JSON is withheld whole when it
/// holds a card number), then cut to [`MAX_ECHOED_FIELD_BYTES`].
fn echo_line(pii: &PiiPolicy, text: &str) -> String {
    match pii.scrub_anywhere(text) {
        Some(scrubbed) => echo(&scrubbed),
        None => echo(text),
    }
}

/// JSON Lines has no header: the first object stands in for one, so a
/// mapping naming a column the export does not have fails at once rather
/// than rejecting every row.
fn check_first_object(mapping: &Mapping, object: &Map<String, Value>, line: u64) -> Result<(), ImportError> {
    let missing: Vec<String> =
        mapping.columns().into_iter().filter(|column| object.cell(column).is_none()).map(str::to_owned).collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(ImportError::Malformed {
            line,
            message: format!("the first record has none of the mapped columns {}", missing.join(", ")),
        })
    }
}

/// The reject file, opened at the first refused row.
struct RejectFile {
    path: PathBuf,
    writer: Option<BufWriter<File>>,
}

impl RejectFile {
    fn new(path: PathBuf) -> Self {
        RejectFile { path, writer: None }
    }

    /// A CSV row is rejected as a CSV line under a header, a JSON line as JSON.
    fn write(&mut self, row: &RejectedRow, raw: RawRow) -> Result<(), ImportError> {
        let failed = |source| ImportError::Rejects { path: self.path.clone(), source };
        if self.writer.is_none() {
            let mut writer = BufWriter::new(File::create(&self.path).map_err(failed)?);
            if matches!(raw, RawRow::Fields(_)) {
                writer.write_all(b"line,column,reason,record\n").map_err(failed)?;
            }
            self.writer = Some(writer);
        }
        let writer = self.writer.as_mut().expect("opened above");
        let line = match raw {
            RawRow::Fields(fields) => csv_line(&[
                row.line.to_string(),
                row.column.clone().unwrap_or_default(),
                row.reason.clone(),
                csv_line(&fields),
            ]),
            RawRow::Line(text) => {
                serde_json::json!({"line": row.line, "column": row.column, "reason": row.reason, "record": text})
                    .to_string()
            }
        };
        writer.write_all(line.as_bytes()).and_then(|()| writer.write_all(b"\n")).map_err(failed)
    }

    /// Flushes the file; removes a stale one from an earlier run when no row
    /// was refused this time.
    fn finish(self) -> Result<Option<PathBuf>, ImportError> {
        match self.writer {
            Some(mut writer) => {
                writer.flush().map_err(|source| ImportError::Rejects { path: self.path.clone(), source })?;
                Ok(Some(self.path))
            }
            None => {
                let _ = std::fs::remove_file(&self.path);
                Ok(None)
            }
        }
    }
}

/// Removes from every reject file in `directory` (the server's import
/// directory) the rows that hold any of `values` — a person's identifier
/// values, when the person is erased: a refused field equal to one (case
/// apart), a refused JSON record holding one as a value at any depth, or a
/// reason quoting one. Each file is rewritten beside itself and renamed
/// over, or removed when no row is left. Returns the rows removed.
///
/// A reject file an import is still writing is rewritten too; rows the
/// import refuses after that go to the file it opened, which is no longer
/// listed, so the erasure wins over those rows.
pub fn erase_from_reject_files(directory: &Path, values: &[String]) -> std::io::Result<u64> {
    let values: Vec<String> =
        values.iter().map(|value| value.trim().to_lowercase()).filter(|value| !value.is_empty()).collect();
    let entries = match std::fs::read_dir(directory) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(error) => return Err(error),
    };
    let mut removed = 0;
    for entry in entries {
        let path = entry?.path();
        let name = path.file_name().and_then(|name| name.to_str()).unwrap_or("");
        let format = if name.ends_with(FileFormat::Csv.reject_extension()) {
            FileFormat::Csv
        } else if name.ends_with(FileFormat::Jsonl.reject_extension()) {
            FileFormat::Jsonl
        } else {
            continue;
        };
        removed += erase_from_reject_file(&path, format, &values)?;
    }
    Ok(removed)
}

fn erase_from_reject_file(path: &Path, format: FileFormat, values: &[String]) -> std::io::Result<u64> {
    let text = std::fs::read_to_string(path)?;
    let (kept, removed) = match format {
        FileFormat::Csv => {
            let mut reader = csv::ReaderBuilder::new().has_headers(true).from_reader(text.as_bytes());
            let mut kept = Vec::new();
            let mut removed = 0;
            for row in reader.records() {
                let row = row.map_err(std::io::Error::other)?;
                let fields: Vec<String> = row.iter().map(str::to_owned).collect();
                let record = csv::ReaderBuilder::new()
                    .has_headers(false)
                    .from_reader(fields.get(3).map_or("", String::as_str).as_bytes())
                    .records()
                    .next()
                    .and_then(Result::ok);
                let in_record = record.is_some_and(|record| record.iter().any(|field| equals_any(field, values)));
                if in_record || fields.get(2).is_some_and(|reason| quotes_any(reason, values)) {
                    removed += 1;
                } else {
                    kept.push(csv_line(&fields));
                }
            }
            (kept, removed)
        }
        FileFormat::Jsonl => {
            let mut kept = Vec::new();
            let mut removed = 0;
            for line in text.lines().filter(|line| !line.trim().is_empty()) {
                let row: Value = serde_json::from_str(line).unwrap_or(Value::Null);
                let record = row["record"].as_str().unwrap_or(line);
                let holds = match serde_json::from_str::<Value>(record) {
                    Ok(value @ (Value::Object(_) | Value::Array(_))) => holds_any(&value, values),
                    _ => quotes_any(record, values),
                };
                if holds || row["reason"].as_str().is_some_and(|reason| quotes_any(reason, values)) {
                    removed += 1;
                } else {
                    kept.push(line.to_owned());
                }
            }
            (kept, removed)
        }
    };
    if removed == 0 {
        return Ok(0);
    }
    if kept.is_empty() {
        std::fs::remove_file(path)?;
        return Ok(removed);
    }
    let mut rewritten = path.as_os_str().to_owned();
    rewritten.push(".erasing");
    let rewritten = PathBuf::from(rewritten);
    {
        let mut file = BufWriter::new(File::create(&rewritten)?);
        if format == FileFormat::Csv {
            file.write_all(b"line,column,reason,record\n")?;
        }
        for line in &kept {
            file.write_all(line.as_bytes())?;
            file.write_all(b"\n")?;
        }
        file.into_inner().map_err(|error| error.into_error())?.sync_all()?;
    }
    std::fs::rename(&rewritten, path)?;
    Ok(removed)
}

/// Whether `field`, trimmed, is one of `values` (lower-cased), case apart.
fn equals_any(field: &str, values: &[String]) -> bool {
    let field = field.trim().to_lowercase();
    values.contains(&field)
}

/// Whether a JSON value holds one of `values` as a string or number at any depth.
fn holds_any(value: &Value, values: &[String]) -> bool {
    match value {
        Value::Object(map) => map.values().any(|inner| holds_any(inner, values)),
        Value::Array(items) => items.iter().any(|inner| holds_any(inner, values)),
        Value::String(text) => equals_any(text, values),
        Value::Number(number) => equals_any(&number.to_string(), values),
        _ => false,
    }
}

/// Whether free text holds one of `values` as a whole word (not inside a
/// longer run of letters, digits or `@._-`), case apart.
fn quotes_any(text: &str, values: &[String]) -> bool {
    let text = text.to_lowercase();
    let part_of_value = |character: Option<char>| {
        character.is_some_and(|character| character.is_alphanumeric() || "@._-+".contains(character))
    };
    values.iter().any(|value| {
        text.match_indices(value.as_str()).any(|(start, found)| {
            !part_of_value(text[..start].chars().next_back())
                && !part_of_value(text[start + found.len()..].chars().next())
        })
    })
}

/// Fields as one CSV line, quoted where needed.
fn csv_line(fields: &[String]) -> String {
    let mut writer =
        csv::WriterBuilder::new().has_headers(false).terminator(csv::Terminator::Any(b'\n')).from_writer(Vec::new());
    let _ = writer.write_record(fields);
    let mut bytes = writer.into_inner().unwrap_or_default();
    if bytes.last() == Some(&b'\n') {
        bytes.pop();
    }
    String::from_utf8(bytes).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tandem_core::{LogPosition, SourceKind};
    use tandem_store::prelude::*;
    use tandem_store::SqliteStore;

    const ORDERS: &str = r#"
        event = "Order Completed"
        row_key = "order_id"
        timestamp = "ordered_at"
        [identifiers]
        user_id = "customer_id"
        email = "email"
        [properties]
        revenue = { column = "total", type = "number" }
    "#;

    struct Fixture {
        _dir: tempfile::TempDir,
        path: PathBuf,
        store: SqliteStore,
        source: Source,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("data")).unwrap();
        let source = store.create_source("orders", SourceKind::Import).unwrap();
        Fixture { path: dir.path().to_owned(), _dir: dir, store, source }
    }

    impl Fixture {
        fn import(&self, name: &str, bytes: &[u8], mapping: &str) -> Result<ImportSummary, ImportError> {
            let input = self.path.join(name);
            std::fs::write(&input, bytes).unwrap();
            let format = FileFormat::from_path(&input).unwrap();
            let mapping = Mapping::from_toml(mapping).unwrap();
            // As `tandem import` does: the rules in force, read from the store.
            let pii = Arc::new(crate::pii::policy_in_force(&self.store, &Default::default()).unwrap());
            let gate = Gate::read(&self.store, pii.clone(), &self.source.id).unwrap();
            let request = ImportRequest {
                source: &self.source,
                mapping: &mapping,
                format,
                input: Box::new(File::open(&input).unwrap()),
                reject_path: reject_path_beside(&input, format),
                gate: &gate,
            };
            run_import(request, &mut StoreSink { store: &self.store, pii: &pii }, &mut |_| {})
        }

        fn events(&self) -> usize {
            self.store.read_log(LogPosition(0), 100_000).unwrap().len()
        }
    }

    #[test]
    fn rows_are_imported_once_however_often_the_file_is() {
        let fixture = fixture();
        let csv = "order_id,customer_id,email,ordered_at,total\n\
                   o1,u1,a@example.com,2026-01-01T00:00:00Z,10\n\
                   o2,u2,b@example.com,2026-01-02T00:00:00Z,20.5\n";
        let first = fixture.import("orders.csv", csv.as_bytes(), ORDERS).unwrap();
        assert_eq!((first.counts.rows_read, first.counts.imported, first.counts.rejected), (2, 2, 0));
        assert_eq!(first.reject_file, None);
        let again = fixture.import("orders.csv", csv.as_bytes(), ORDERS).unwrap();
        assert_eq!((again.counts.imported, again.counts.duplicates), (0, 2));
        assert_eq!(fixture.events(), 2);

        // The same rows gzipped, with one more: only the new one is stored.
        let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gzip.write_all(csv.as_bytes()).unwrap();
        gzip.write_all(b"o3,u3,c@example.com,2026-01-03,30\n").unwrap();
        let gzipped = fixture.import("orders.csv.gz", &gzip.finish().unwrap(), ORDERS).unwrap();
        assert_eq!((gzipped.counts.imported, gzipped.counts.duplicates), (1, 2));
        assert_eq!(fixture.events(), 3);
    }

    #[test]
    fn every_kind_of_bad_row_lands_in_the_reject_file_with_its_reason() {
        let fixture = fixture();
        let csv = "order_id,customer_id,email,ordered_at,total\n\
                   o1,u1,a@example.com,2026-01-01T00:00:00Z,10\n\
                   o2,u2,b@example.com,last tuesday,20\n\
                   o3,,,2026-01-03T00:00:00Z,30\n\
                   o4,u4,d@example.com,2026-01-04T00:00:00Z,twelve\n\
                   ,u5,e@example.com,2026-01-05T00:00:00Z,50\n\
                   o6,u6,\"f@example.com\",2026-01-06T00:00:00Z,60\n";
        let summary = fixture.import("orders.csv", csv.as_bytes(), ORDERS).unwrap();
        assert_eq!((summary.counts.rows_read, summary.counts.imported, summary.counts.rejected), (6, 2, 4));
        let lines: Vec<(u64, Option<&str>)> =
            summary.first_rejects.iter().map(|row| (row.line, row.column.as_deref())).collect();
        assert_eq!(lines, vec![(3, Some("ordered_at")), (4, Some("email")), (5, Some("total")), (6, Some("order_id"))]);

        let path = summary.reject_file.expect("a reject file");
        assert!(path.ends_with("orders.csv.rejects.csv"), "{}", path.display());
        let mut reader = csv::Reader::from_path(&path).unwrap();
        assert_eq!(reader.headers().unwrap(), vec!["line", "column", "reason", "record"]);
        let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
        assert_eq!(rows.len(), 4);
        assert_eq!(&rows[0][0], "3");
        assert!(rows[0][2].contains("\"last tuesday\" is not an ISO 8601 timestamp"), "{:?}", &rows[0][2]);
        assert!(rows[1][2].starts_with("no identifier"), "{:?}", &rows[1][2]);
        assert!(rows[2][2].contains("not a number"), "{:?}", &rows[2][2]);
        assert_eq!(&rows[2][3], "o4,u4,d@example.com,2026-01-04T00:00:00Z,twelve");
        assert_eq!(&rows[3][2], "row key order_id is empty");

        // Fixed and imported again: the reject file of the last run goes away.
        let fixed = "order_id,customer_id,email,ordered_at,total\no2,u2,b@example.com,2026-01-02,20\n";
        let summary = fixture.import("orders.csv", fixed.as_bytes(), ORDERS).unwrap();
        assert_eq!((summary.counts.imported, summary.reject_file), (1, None));
        assert!(!path.exists());
    }

    #[test]
    fn governance_refuses_rows_into_the_quarantine_and_counts_violations() {
        use tandem_core::govern::dsr::identifier_digest;
        use tandem_core::govern::pii::{PiiRule, RedPolicy};
        use tandem_core::govern::plan::TrackingPlan;
        use tandem_core::govern::PiiClass;
        let fixture = fixture();
        let mapping = format!("{ORDERS}\ncoupon = \"coupon\"\ntax_id = \"tax_id\"\n");
        let plan = r#"{"mode": "block_invalid", "events": {"Order Completed": {"type": "object",
            "properties": {"revenue": {"type": "number", "maximum": 1000}}}}}"#;
        fixture.store.set_plan(&fixture.source.id, &TrackingPlan::from_json(plan).unwrap()).unwrap();
        let refuse = PiiRule {
            name: Some("tax_id".into()),
            pattern: None,
            class: PiiClass::Red,
            policy: Some(RedPolicy::Refuse),
        };
        fixture.store.set_pii_rule(&refuse, 1).unwrap();
        let suppressed: tandem_core::Identifier = "email:gone@example.com".parse().unwrap();
        fixture.store.suppress(&identifier_digest(&suppressed), 1).unwrap();
        let csv = "order_id,customer_id,email,ordered_at,total,coupon,tax_id\n\
                   o1,u1,a@example.com,2026-01-01T00:00:00Z,10,,\n\
                   o2,u2,gone@example.com,2026-01-02T00:00:00Z,20,,\n\
                   o3,u3,c@example.com,2026-01-03T00:00:00Z,5000,,\n\
                   o4,u4,d@example.com,2026-01-04T00:00:00Z,40,,DE-tax-991\n\
                   o5,u5,e@example.com,2026-01-05T00:00:00Z,50,SPRING,\n";
        let summary = fixture.import("orders.csv", csv.as_bytes(), &mapping).unwrap();
        let counts = summary.counts;
        assert_eq!(
            (counts.rows_read, counts.imported, counts.rejected, counts.quarantined),
            (5, 2, 3, 3),
            "{counts:?}"
        );
        let refused: Vec<(u64, Option<&str>)> =
            summary.first_rejects.iter().map(|row| (row.line, row.column.as_deref())).collect();
        assert_eq!(refused, vec![(3, Some("email")), (4, Some("/properties/revenue")), (5, Some("properties.tax_id"))]);
        let quarantine = fixture.store.list_quarantine(0, 10).unwrap();
        let codes: Vec<(&str, Option<u32>)> =
            quarantine.iter().map(|entry| (entry.record.code.as_str(), entry.record.batch_index)).collect();
        assert_eq!(codes, [("suppressed", Some(3)), ("plan_violation", Some(4)), ("red_value_refused", Some(5))]);
        assert!(quarantine[0].record.payload.starts_with("sha256:"), "a suppressed person's row is kept as a digest");
        let red = &quarantine[2].record.payload;
        assert!(!red.contains("DE-tax-991") && red.contains("sha256:"), "the refused red value is hashed: {red}");
        let rejects = std::fs::read_to_string(summary.reject_file.unwrap()).unwrap();
        assert!(!rejects.contains("gone@example.com") && !rejects.contains("DE-tax-991"), "{rejects}");
        let violations = fixture.store.plan_violations(&fixture.source.id, 10).unwrap();
        assert_eq!(violations.len(), 1);
        assert_eq!((violations[0].kind.as_str(), violations[0].count), ("invalid_event", 1));
        let stats = fixture.store.stats().unwrap();
        assert_eq!(stats.rejected, 3, "quarantined rows count as rejected like refused tracking calls");
    }

    #[test]
    fn rows_that_do_not_map_are_echoed_with_their_red_values_hashed() {
        let fixture = fixture();
        let mapping = format!("{ORDERS}\ncard = \"card\"\npassword = \"password\"\n");
        // `total` is not a number: each row is refused by its mapping and
        // echoed in the reject file, but never with a red value in clear.
        let csv = "order_id,customer_id,email,ordered_at,total,card,password\n\
                   o1,u1,a@example.com,2026-01-01T00:00:00Z,ten,4111 1111 1111 1111,hunter2\n";
        let summary = fixture.import("orders.csv", csv.as_bytes(), &mapping).unwrap();
        assert_eq!(summary.counts.rejected, 1);
        let rejects = std::fs::read_to_string(summary.reject_file.unwrap()).unwrap();
        assert!(!rejects.contains("4111 1111 1111 1111") && !rejects.contains("hunter2"), "{rejects}");
        let mut reader = csv::Reader::from_reader(rejects.as_bytes());
        let row = reader.records().next().unwrap().unwrap();
        let fields: Vec<String> = csv::ReaderBuilder::new()
            .has_headers(false)
            .from_reader(row[3].as_bytes())
            .records()
            .next()
            .unwrap()
            .unwrap()
            .iter()
            .map(str::to_owned)
            .collect();
        assert_eq!(&fields[..5], ["o1", "u1", "a@example.com", "2026-01-01T00:00:00Z", "ten"], "the rest as it was");
        assert!(fields[5].starts_with("sha256:") && fields[6].starts_with("sha256:"), "{fields:?}");

        let jsonl = concat!(
            r#"{"order_id":"o2","customer_id":"u2","email":"b@example.com","ordered_at":"2026-01-02T00:00:00Z","#,
            r#""total":"ten","payment":{"card":"5500 0000 0000 0004"},"note":"pw","password":"swordfish"}"#,
            "\n",
            "not json, card 4111111111111111\n",
        );
        let summary = fixture.import("orders.jsonl", jsonl.as_bytes(), ORDERS).unwrap();
        assert_eq!(summary.counts.rejected, 2);
        let rejects = std::fs::read_to_string(summary.reject_file.unwrap()).unwrap();
        for secret in ["5500 0000 0000 0004", "swordfish", "4111111111111111"] {
            assert!(!rejects.contains(secret), "{secret} in {rejects}");
        }
        let first: Value = serde_json::from_str(rejects.lines().next().unwrap()).unwrap();
        let record: Value = serde_json::from_str(first["record"].as_str().unwrap()).unwrap();
        assert_eq!((record["order_id"].as_str(), record["total"].as_str()), (Some("o2"), Some("ten")));
        assert!(record["password"].as_str().unwrap().starts_with("sha256:"), "{record}");
    }

    #[test]
    fn erasing_a_person_removes_only_their_rows_from_reject_files() {
        let directory = tempfile::tempdir().unwrap();
        let lines = [
            json!({"line": 2, "column": null, "reason": "bad", "record": r#"{"user":{"email":"Ann@Example.com"}}"#}),
            json!({"line": 3, "column": null, "reason": "bad", "record": r#"{"user":{"email":"joann@example.com"}}"#}),
            json!({"line": 4, "column": "id", "reason": "\"u-7\" is taken", "record": "not json"}),
            json!({"line": 5, "column": null, "reason": "bad", "record": "not json, u-77"}),
        ];
        let jsonl: String = lines.iter().map(|line| format!("{line}\n")).collect();
        let jsonl_path = directory.path().join("imp_1.rejects.jsonl");
        std::fs::write(&jsonl_path, jsonl).unwrap();
        let csv = "line,column,reason,record\n2,total,not a number,\"o1,ANN@example.com,x\"\n3,total,not a number,\"o2,b@example.com,y\"\n";
        let csv_path = directory.path().join("imp_2.rejects.csv");
        std::fs::write(&csv_path, csv).unwrap();
        let only_ann = "line,column,reason,record\n2,total,not a number,\"o1,ann@example.com,x\"\n";
        let only_ann_path = directory.path().join("imp_3.rejects.csv");
        std::fs::write(&only_ann_path, only_ann).unwrap();
        std::fs::write(directory.path().join("imp_4.upload"), "ann@example.com").unwrap();

        let values = ["ann@example.com".to_owned(), "u-7".to_owned()];
        assert_eq!(erase_from_reject_files(directory.path(), &values).unwrap(), 4);
        let kept: Vec<u64> = std::fs::read_to_string(&jsonl_path)
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str::<Value>(line).unwrap()["line"].as_u64().unwrap())
            .collect();
        assert_eq!(kept, [3, 5], "a longer value is someone else's");
        assert_eq!(
            std::fs::read_to_string(&csv_path).unwrap(),
            "line,column,reason,record\n3,total,not a number,\"o2,b@example.com,y\"\n"
        );
        assert!(!only_ann_path.exists(), "a file left with no row goes");
        assert!(directory.path().join("imp_4.upload").exists(), "only reject files are read");
        assert_eq!(erase_from_reject_files(directory.path(), &values).unwrap(), 0);
        assert_eq!(erase_from_reject_files(&directory.path().join("absent"), &values).unwrap(), 0);
    }

    #[test]
    fn malformed_files_fail_at_the_named_line_or_column() {
        let fixture = fixture();
        let missing =
            fixture.import("orders.csv", b"order_id,customer_id,ordered_at,total\no1,u1,2026-01-01,1\n", ORDERS);
        match missing {
            Err(ImportError::MissingColumns(columns)) => assert_eq!(columns, vec!["email"]),
            other => panic!("expected missing columns, got {other:?}"),
        }

        let open_quote = "order_id,customer_id,email,ordered_at,total\n\
                          o1,u1,a@example.com,2026-01-01,1\n\
                          o2,\"u2,b@example.com,2026-01-02,2\n\
                          o3,u3,c@example.com,2026-01-03,3\n";
        match fixture.import("quotes.csv", open_quote.as_bytes(), ORDERS) {
            Err(ImportError::Malformed { line: 3, message }) => assert!(message.contains("quote"), "{message}"),
            other => panic!("expected a malformed line 3, got {other:?}"),
        }

        let mut latin1 = b"order_id,customer_id,email,ordered_at,total\no1,u1,a@example.com,2026-01-01,1\n".to_vec();
        latin1.extend_from_slice(b"o2,J\xfcrgen,b@example.com,2026-01-02,2\n");
        match fixture.import("latin1.csv", &latin1, ORDERS) {
            Err(ImportError::Malformed { line: 3, message }) => {
                assert_eq!(message, "column customer_id is not valid UTF-8")
            }
            other => panic!("expected a malformed line 3, got {other:?}"),
        }
    }

    #[test]
    fn json_lines_rows_are_mapped_and_bad_lines_rejected() {
        let fixture = fixture();
        let jsonl = concat!(
            r#"{"order_id":"o1","customer_id":"u1","email":"a@example.com","ordered_at":"2026-01-01","total":10}"#,
            "\n\n",
            "{not json\n",
            r#"["an","array"]"#,
            "\n",
            r#"{"order_id":"o2","customer_id":"u2","email":"b@example.com","ordered_at":"2026-01-02","total":"x"}"#,
            "\n"
        );
        let summary = fixture.import("orders.jsonl", jsonl.as_bytes(), ORDERS).unwrap();
        assert_eq!((summary.counts.rows_read, summary.counts.imported, summary.counts.rejected), (4, 1, 3));
        let lines: Vec<u64> = summary.first_rejects.iter().map(|row| row.line).collect();
        assert_eq!(lines, vec![3, 4, 5]);
        let rejects = std::fs::read_to_string(summary.reject_file.unwrap()).unwrap();
        let first: Value = serde_json::from_str(rejects.lines().next().unwrap()).unwrap();
        assert_eq!(first["record"], "{not json");
        assert!(first["reason"].as_str().unwrap().contains("not valid JSON"));

        let wrong_mapping = fixture.import("other.jsonl", b"{\"id\":1}\n", ORDERS);
        assert!(matches!(wrong_mapping, Err(ImportError::Malformed { line: 1, .. })), "{wrong_mapping:?}");
    }

    fn gzip_fast(bytes: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    }

    #[test]
    fn an_import_decompression_bomb_expanded_without_bound() {
        let fixture = fixture();
        let mut csv = b"customer_id,order_id,ordered_at,email,total\nc1,o1,2024-01-01,\"".to_vec();
        csv.resize(csv.len() + 40 * 1024 * 1024, b'x');
        csv.extend_from_slice(b"\",1\n");
        let bomb = gzip_fast(&csv);
        assert!(bomb.len() * 200 < csv.len(), "the test file must expand more than the bound");
        let error = fixture.import("bomb.csv.gz", &bomb, ORDERS).unwrap_err();
        assert!(error.to_string().contains("decompression bomb"), "{error}");
        assert_eq!(fixture.events(), 0);
    }

    #[test]
    fn an_import_row_with_a_huge_field_was_buffered_and_echoed_whole() {
        let fixture = fixture();
        let mut csv =
            b"customer_id,order_id,ordered_at,email,total\nc1,o1,2024-01-01,a@x.test,1\nc2,o2,2024-01-01,\"".to_vec();
        csv.resize(csv.len() + 5 * MAX_ROW_BYTES, b'y');
        csv.extend_from_slice(b"\",2\nc3,o3,2024-01-01,c@x.test,not-a-number-");
        csv.resize(csv.len() + 200 * 1024, b'z');
        csv.extend_from_slice(b"\nc4,o4,2024-01-02,d@x.test,4\n");
        let summary = fixture.import("huge.csv", &csv, ORDERS).unwrap();
        assert_eq!((summary.counts.rows_read, summary.counts.imported, summary.counts.rejected), (4, 2, 2));
        assert_eq!(fixture.events(), 2);
        let [long, bad_total] = &summary.first_rejects[..] else { panic!("two rejects: {:?}", summary.first_rejects) };
        assert_eq!(long.line, 3);
        assert!(long.reason.contains("longer than the limit"), "{}", long.reason);
        assert_eq!(bad_total.line, 4);
        assert!(bad_total.reason.len() <= MAX_REASON_CHARS + 50, "the status echoes at most a short reason");
        let reject_file = std::fs::metadata(summary.reject_file.unwrap()).unwrap().len();
        assert!(
            reject_file < 4 * MAX_ECHOED_FIELD_BYTES as u64,
            "the reject file echoes cut fields: {reject_file} bytes"
        );
    }

    #[test]
    fn a_json_line_longer_than_the_limit_is_refused_alone() {
        let fixture = fixture();
        let long = format!("{{\"customer_id\": \"c2\", \"order_id\": \"{}\"}}", "9".repeat(2 * MAX_ROW_BYTES));
        let jsonl = format!("{{\"customer_id\": \"c1\", \"order_id\": \"o1\"}}\n{long}\n{{\"customer_id\": \"c3\", \"order_id\": \"o3\"}}\n");
        let mapping = "event = \"Order Completed\"\nrow_key = \"order_id\"\n[identifiers]\nuser_id = \"customer_id\"\n";
        let summary = fixture.import("orders.jsonl", jsonl.as_bytes(), mapping).unwrap();
        assert_eq!((summary.counts.imported, summary.counts.rejected), (2, 1));
        assert_eq!(summary.first_rejects[0].line, 2);
    }

    #[test]
    fn an_import_stops_within_a_row_when_asked() {
        let fixture = fixture();
        let input = fixture.path.join("orders.csv");
        std::fs::write(&input, "customer_id,order_id,ordered_at,email,total\nc1,o1,2024-01-01,a@x.test,1\n").unwrap();
        let mapping = Mapping::from_toml(ORDERS).unwrap();
        let request = ImportRequest {
            source: &fixture.source,
            mapping: &mapping,
            format: FileFormat::Csv,
            input: Box::new(File::open(&input).unwrap()),
            reject_path: reject_path_beside(&input, FileFormat::Csv),
            gate: &Gate::open(),
        };
        let stop = AtomicBool::new(true);
        let sink = &mut StoreSink { store: &fixture.store, pii: &Default::default() };
        let error = run_import_until(request, sink, &mut |_| {}, &stop).unwrap_err();
        assert!(matches!(error, ImportError::Stopped { line: 2 }), "{error}");
        assert!(error.to_string().contains("import the file again"));
    }
}
