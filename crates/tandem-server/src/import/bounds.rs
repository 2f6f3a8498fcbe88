//! The bounds that keep an import's time and memory linear in its file, even
//! for a hostile one: how far a gzip upload may expand, how long one row may
//! be, and how much of a refused row is echoed back.
//!
//! A 205 KB gzip file can hold a 200 MB field. Without bounds the reader
//! buffers the whole field, the mapping copies it, the reject file and the
//! job's status repeat it. With them a row over [`MAX_ROW_BYTES`] is cut as
//! it streams past (never buffered whole) and refused, and a file expanding
//! beyond [`MAX_EXPANSION_RATIO`] stops the import.

use std::collections::VecDeque;
use std::io::{self, BufRead, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The longest row (CSV record or JSON line) an import reads, in bytes.
/// A row becomes one message, and a message is at most 32 KB, so a row this
/// long could never be imported; the bound leaves room for unmapped columns.
pub const MAX_ROW_BYTES: usize = 1024 * 1024;

/// How many times its compressed size a gzip file may expand, once past
/// [`EXPANSION_ALLOWANCE`]. Exports of real silos compress 5 to 30 times;
/// a decompression bomb, 1,000 times and more.
pub const MAX_EXPANSION_RATIO: u64 = 100;

/// Decompressed bytes always allowed, whatever the ratio, so that small,
/// very repetitive files are not refused.
pub const EXPANSION_ALLOWANCE: u64 = 16 * 1024 * 1024;

/// The most of one refused field that a reject file echoes back.
pub const MAX_ECHOED_FIELD_BYTES: usize = 64 * 1024;

/// The most of a refusal's reason that a job's status and reject file show.
pub const MAX_REASON_CHARS: usize = 300;

/// Counts compressed bytes as they are read, for progress and the ratio bound.
pub struct CountingReader<R> {
    pub inner: R,
    pub count: Arc<AtomicU64>,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        let read = self.inner.read(buffer)?;
        self.count.fetch_add(read as u64, Ordering::Relaxed);
        Ok(read)
    }
}

/// Fails the read once the decompressed output outgrows its compressed input
/// by more than [`MAX_EXPANSION_RATIO`] (past [`EXPANSION_ALLOWANCE`]).
pub struct ExpansionBound<R> {
    pub inner: R,
    pub compressed: Arc<AtomicU64>,
    pub decompressed: u64,
}

impl<R: Read> Read for ExpansionBound<R> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        let read = self.inner.read(buffer)?;
        self.decompressed += read as u64;
        let compressed = self.compressed.load(Ordering::Relaxed).max(1);
        if self.decompressed > EXPANSION_ALLOWANCE && self.decompressed / compressed > MAX_EXPANSION_RATIO {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the gzip file expands more than {MAX_EXPANSION_RATIO} times its size ({} bytes from {compressed}); \
                     is it a decompression bomb?",
                    self.decompressed
                ),
            ));
        }
        Ok(read)
    }
}

/// How rows end in a format: CSV quotes may hold line breaks, JSON Lines not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowSyntax {
    Csv,
    Lines,
}

/// Passes a file through, cutting every row longer than [`MAX_ROW_BYTES`]:
/// the rest of such a row is skipped as it streams by (a CSV quote left open
/// by the cut is closed), and the offset of the cut, in the output, is noted
/// in [`RowCuts`] so the reader can refuse that row. Memory stays bounded
/// whatever the row, and the work is one pass over each byte.
pub struct RowBound<R> {
    inner: R,
    syntax: RowSyntax,
    limit: usize,
    /// Bytes of the current row passed on so far.
    row_bytes: usize,
    /// Where the input is within a CSV record.
    field: FieldState,
    /// Skipping the rest of a cut row.
    skipping: bool,
    /// The cut row was cut inside a quoted field, whose quote must be closed
    /// before its line break.
    close_quote: bool,
    /// Bytes passed on so far.
    offset: u64,
    cuts: RowCuts,
}

/// Where a CSV reader is within a record, as the `csv` crate reads it: a
/// quote opens a quoted field only at the start of a field, elsewhere it is
/// text, so a stray `5" screen` does not swallow the lines after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FieldState {
    Start,
    Unquoted,
    Quoted,
    /// A quote inside a quoted field: its end, or the first of a `""` pair.
    QuoteInQuoted,
}

impl FieldState {
    /// The state after `byte`, and whether `byte` ends the record.
    fn next(self, byte: u8) -> (FieldState, bool) {
        match (self, byte) {
            (FieldState::Quoted, b'"') => (FieldState::QuoteInQuoted, false),
            (FieldState::Quoted, _) => (FieldState::Quoted, false),
            (FieldState::QuoteInQuoted, b'"') => (FieldState::Quoted, false),
            (_, b'\n') => (FieldState::Start, true),
            (_, b',') => (FieldState::Start, false),
            (FieldState::Start, b'"') => (FieldState::Quoted, false),
            _ => (FieldState::Unquoted, false),
        }
    }
}

/// The output offsets at which rows were cut, oldest first.
#[derive(Clone, Default)]
pub struct RowCuts(Arc<Mutex<VecDeque<u64>>>);

impl RowCuts {
    /// Whether the row spanning `start..=end` of the output was cut. Rows
    /// are asked about in order, so the cuts up to `end` are forgotten.
    pub fn cut_within(&self, start: u64, end: u64) -> bool {
        let mut cuts = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut found = false;
        while let Some(&cut) = cuts.front() {
            if cut > end {
                break;
            }
            found |= cut >= start;
            cuts.pop_front();
        }
        found
    }

    fn push(&self, offset: u64) {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push_back(offset);
    }
}

impl<R: BufRead> RowBound<R> {
    pub fn new(inner: R, syntax: RowSyntax) -> Self {
        RowBound::with_limit(inner, syntax, MAX_ROW_BYTES)
    }

    pub fn with_limit(inner: R, syntax: RowSyntax, limit: usize) -> Self {
        RowBound {
            inner,
            syntax,
            limit,
            row_bytes: 0,
            field: FieldState::Start,
            skipping: false,
            close_quote: false,
            offset: 0,
            cuts: RowCuts::default(),
        }
    }

    /// The cuts made so far, shared with the reader that refuses their rows.
    pub fn cuts(&self) -> RowCuts {
        self.cuts.clone()
    }
}

impl<R: BufRead> Read for RowBound<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            let available = self.inner.fill_buf()?;
            if available.is_empty() {
                return Ok(0);
            }
            let (mut consumed, mut written) = (0, 0);
            while consumed < available.len() && written < out.len() {
                let byte = available[consumed];
                let (field, ends_row) = match self.syntax {
                    RowSyntax::Csv => self.field.next(byte),
                    RowSyntax::Lines => (FieldState::Start, byte == b'\n'),
                };
                if self.skipping && ends_row && self.close_quote {
                    // Close the quote the cut left open; the line break
                    // follows in the next pass of this loop.
                    out[written] = b'"';
                    written += 1;
                    self.close_quote = false;
                    continue;
                }
                consumed += 1;
                let before = std::mem::replace(&mut self.field, field);
                if self.skipping && !ends_row {
                    continue;
                }
                if ends_row {
                    self.row_bytes = 0;
                    self.skipping = false;
                } else {
                    self.row_bytes += 1;
                    if self.row_bytes > self.limit {
                        self.skipping = true;
                        // What was passed on ends where the input was before
                        // this byte: inside a quoted field, the cut leaves it
                        // open. (After a quote in one, the line break closes it.)
                        self.close_quote = before == FieldState::Quoted;
                        self.cuts.push(self.offset + written as u64);
                        continue;
                    }
                }
                out[written] = byte;
                written += 1;
            }
            self.inner.consume(consumed);
            self.offset += written as u64;
            if written > 0 {
                return Ok(written);
            }
        }
    }
}

/// At most `limit` bytes of `text` (cut at a character boundary), saying how
/// much was left out.
pub fn truncated(text: &str, limit: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= limit {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut end = limit;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    std::borrow::Cow::Owned(format!("{}… ({} more bytes not shown)", &text[..end], text.len() - end))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounded(input: &str, syntax: RowSyntax, limit: usize) -> (String, RowCuts) {
        let mut bound = RowBound::with_limit(io::BufReader::with_capacity(7, input.as_bytes()), syntax, limit);
        let cuts = bound.cuts();
        let mut out = String::new();
        bound.read_to_string(&mut out).unwrap();
        (out, cuts)
    }

    #[test]
    fn long_rows_are_cut_and_noted_short_ones_pass_whole() {
        let (out, cuts) = bounded("a,b\n1,2345678\n3,4\n", RowSyntax::Csv, 5);
        assert_eq!(out, "a,b\n1,234\n3,4\n");
        assert!(!cuts.cut_within(0, 3));
        assert!(cuts.cut_within(4, 10));
        assert!(!cuts.cut_within(11, 14));
    }

    #[test]
    fn a_cut_inside_quotes_closes_them_and_quoted_line_breaks_do_not_end_rows() {
        let (out, _) = bounded("a\n\"x\ny\"\n\"long\nquoted\"\nz\n", RowSyntax::Csv, 6);
        assert_eq!(out, "a\n\"x\ny\"\n\"long\n\"\nz\n");
        let rows: Vec<_> = csv::ReaderBuilder::new()
            .has_headers(false)
            .from_reader(out.as_bytes())
            .records()
            .map(|record| record.unwrap().get(0).unwrap().to_owned())
            .collect();
        assert_eq!(rows, ["a", "x\ny", "long\n", "z"]);
    }

    #[test]
    fn a_stray_quote_inside_an_unquoted_field_is_text_as_for_the_csv_reader() {
        let (out, cuts) = bounded("a,5\" screen\nb,ok\nc,0123456789\nd,ok\n", RowSyntax::Csv, 8);
        assert_eq!(out, "a,5\" scr\nb,ok\nc,012345\nd,ok\n", "the stray quote opens nothing");
        assert!(cuts.cut_within(0, 9), "the first row is cut");
        assert!(!cuts.cut_within(10, 14), "the second is whole");
        assert!(cuts.cut_within(15, 23), "the third is cut");
        let (out, _) = bounded("a,\"x\"\"y\"\nb,\"quoted, with \"\"escapes\"\"\"\nc\n", RowSyntax::Csv, 12);
        let rows: Vec<_> = csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .from_reader(out.as_bytes())
            .records()
            .map(|record| record.unwrap().iter().collect::<Vec<_>>().join("|"))
            .collect();
        assert_eq!(rows, ["a|x\"y", "b|quoted, w", "c"]);
    }

    #[test]
    fn json_lines_ignore_quotes() {
        let (out, cuts) = bounded("{\"a\":\"\"}\n{\"b\":\"0123456789\"}\n{}\n", RowSyntax::Lines, 10);
        assert_eq!(out, "{\"a\":\"\"}\n{\"b\":\"0123\n{}\n");
        assert!(cuts.cut_within(9, 20));
    }

    #[test]
    fn a_decompression_bomb_stops_at_the_ratio() {
        let zeros = vec![0u8; (EXPANSION_ALLOWANCE as usize) * 2];
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        std::io::Write::write_all(&mut encoder, &zeros).unwrap();
        let gzipped = encoder.finish().unwrap();
        let compressed = Arc::new(AtomicU64::new(0));
        let counted = CountingReader { inner: gzipped.as_slice(), count: compressed.clone() };
        let mut bounded = ExpansionBound { inner: flate2::read::GzDecoder::new(counted), compressed, decompressed: 0 };
        let error = io::copy(&mut bounded, &mut io::sink()).unwrap_err();
        assert!(error.to_string().contains("decompression bomb"), "{error}");
    }

    #[test]
    fn echoes_are_truncated_at_a_character_boundary() {
        assert_eq!(truncated("short", 10), "short");
        assert_eq!(truncated("ééé", 3), "é… (4 more bytes not shown)");
    }
}
