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
    /// Inside a quoted CSV field, in the input.
    in_quotes: bool,
    /// Inside a quoted CSV field, in what was passed on.
    passed_in_quotes: bool,
    /// Skipping the rest of a cut row.
    skipping: bool,
    /// A closing quote to pass on before the cut row's line break.
    pending_quote: bool,
    /// Bytes passed on so far.
    offset: u64,
    cuts: RowCuts,
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
            in_quotes: false,
            passed_in_quotes: false,
            skipping: false,
            pending_quote: false,
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
            if self.pending_quote {
                out[0] = b'"';
                self.pending_quote = false;
                self.passed_in_quotes = false;
                self.offset += 1;
                return Ok(1);
            }
            let available = self.inner.fill_buf()?;
            if available.is_empty() {
                return Ok(0);
            }
            let (mut consumed, mut written) = (0, 0);
            while consumed < available.len() && written < out.len() {
                let byte = available[consumed];
                let quote = self.syntax == RowSyntax::Csv && byte == b'"';
                let ends_row = byte == b'\n' && !self.in_quotes;
                if self.skipping && ends_row && self.passed_in_quotes {
                    // Close the quote the cut left open before the line break,
                    // which is read again on the next call.
                    self.pending_quote = true;
                    break;
                }
                consumed += 1;
                self.in_quotes ^= quote;
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
                        self.cuts.push(self.offset + written as u64);
                        continue;
                    }
                }
                self.passed_in_quotes ^= quote;
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
