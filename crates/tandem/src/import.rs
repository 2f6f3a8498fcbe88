//! `tandem import`: runs a bulk import against the data directory, with a
//! progress bar on a terminal and plain progress lines otherwise, then prints
//! what happened to every row. With an event stream (`--log nats://…`) the
//! rows are published to it like a server's imports, for the drain to append.
//! Rows pass the governance a server applies (suppression, the PII rules in
//! force, the source's tracking plan), read from the store as it starts.

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_core::mapping::Mapping;
use tandem_server::govern::Gate;
use tandem_server::import::{
    reject_path_beside, run_import, FileFormat, ImportCounts, ImportRequest, ImportSummary, StoreSink,
};
use tandem_store::Store;

/// How often plain progress lines are printed when stderr is not a terminal.
const PLAIN_PROGRESS_EVERY: Duration = Duration::from_secs(2);

pub struct ImportArgs<'a> {
    /// The configured PII settings (`[pii]`), under the stored rules.
    pub pii: &'a tandem_core::govern::PiiSettings,
    pub file: &'a Path,
    pub source: &'a str,
    pub mapping: &'a Path,
    pub format: Option<&'a str>,
    pub as_json: bool,
    /// The event stream to publish to instead of appending to the store.
    pub log: Option<&'a tandem_server::stream::StreamOptions>,
}

pub fn import(store: &dyn Store, args: ImportArgs<'_>, out: &mut impl Write) -> anyhow::Result<()> {
    let mapping_text = std::fs::read_to_string(args.mapping)
        .with_context(|| format!("cannot read the mapping {}", args.mapping.display()))?;
    let mapping = Mapping::from_toml(&mapping_text)
        .with_context(|| format!("mapping {} is not usable", args.mapping.display()))?;
    let format = match args.format {
        Some(name) => FileFormat::parse(name).with_context(|| format!("--format {name:?} is not csv or jsonl"))?,
        None => FileFormat::from_path(args.file).with_context(|| {
            format!("cannot tell the format of {} from its name; pass --format csv or jsonl", args.file.display())
        })?,
    };
    let source = match store.source_by_name(args.source) {
        Ok(source) => source,
        Err(tandem_store::StoreError::SourceNotFound(name)) => {
            bail!("no source named {name:?}; create it with `tandem source create {name} --kind import`")
        }
        Err(error) => return Err(error.into()),
    };
    let file = std::fs::File::open(args.file).with_context(|| format!("cannot read {}", args.file.display()))?;
    let size = file.metadata().map(|metadata| metadata.len()).unwrap_or(0);
    let pii = Arc::new(tandem_server::pii::policy_in_force(store, args.pii)?);
    let gate = Gate::read(store, pii.clone(), &source.id)?;
    let request = ImportRequest {
        source: &source,
        mapping: &mapping,
        format,
        input: Box::new(file),
        reject_path: reject_path_beside(args.file, format),
        gate: &gate,
    };
    let mut progress = Progress::new(size);
    let summary = match args.log {
        None => run_import(request, &mut StoreSink { store, pii: &pii }, &mut |counts| progress.update(counts)),
        Some(log) => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            let stream = runtime.block_on(tandem_server::stream::EventStream::connect(log))?;
            let mut publish = |mut batch: tandem_store::IngestBatch| {
                // The stream holds what the log will: red values hashed first.
                tandem_server::pii::scrub_batch(&pii, &mut batch);
                runtime.block_on(stream.publish(&batch)).map_err(|error| error.to_string())
            };
            run_import(request, &mut publish, &mut |counts| progress.update(counts))
        }
    };
    progress.finish();
    let summary = summary.with_context(|| format!("import of {} stopped", args.file.display()))?;
    report(&summary, args.as_json, out)
}

fn report(summary: &ImportSummary, as_json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    if as_json {
        writeln!(out, "{}", serde_json::to_string(summary)?)?;
        return Ok(());
    }
    let counts = &summary.counts;
    let seconds = summary.elapsed.as_secs_f64();
    let rate = if seconds > 0.0 { counts.rows_read as f64 / seconds } else { 0.0 };
    writeln!(
        out,
        "read {} rows in {seconds:.1} s ({rate:.0} rows/s): {} imported, {} duplicates, {} rejected",
        counts.rows_read, counts.imported, counts.duplicates, counts.rejected
    )?;
    if counts.quarantined > 0 {
        writeln!(
            out,
            "{} of the rejected rows were refused by governance (suppressed, a refused red value, the tracking plan) and are in the quarantine",
            counts.quarantined
        )?;
    }
    if let Some(path) = &summary.reject_file {
        writeln!(out, "rejected rows, with their line and reason: {}", path.display())?;
        for row in summary.first_rejects.iter().take(5) {
            let column = row.column.as_deref().map(|column| format!(" [{column}]")).unwrap_or_default();
            writeln!(out, "  line {}{column}: {}", row.line, row.reason)?;
        }
    }
    Ok(())
}

/// A progress bar on a terminal; a line every few seconds otherwise.
enum Progress {
    Bar(ProgressBar),
    Plain { started: Instant, last: Instant },
}

impl Progress {
    fn new(file_size: u64) -> Progress {
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(Some(file_size), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("{bar:30} {percent:>3}% {msg} [{elapsed_precise}, eta {eta}]")
                    .expect("a valid progress template"),
            );
            Progress::Bar(bar)
        } else {
            let now = Instant::now();
            Progress::Plain { started: now, last: now }
        }
    }

    fn update(&mut self, counts: &ImportCounts) {
        match self {
            Progress::Bar(bar) => {
                let seconds = bar.elapsed().as_secs_f64().max(0.001);
                bar.set_position(counts.bytes_read);
                bar.set_message(format!(
                    "{} rows, {:.0} rows/s, {} rejected",
                    counts.rows_read,
                    counts.rows_read as f64 / seconds,
                    counts.rejected
                ));
            }
            Progress::Plain { started, last } => {
                if last.elapsed() >= PLAIN_PROGRESS_EVERY {
                    *last = Instant::now();
                    let seconds = started.elapsed().as_secs_f64();
                    eprintln!(
                        "import: {} rows read ({:.0} rows/s), {} imported, {} duplicates, {} rejected",
                        counts.rows_read,
                        counts.rows_read as f64 / seconds,
                        counts.imported,
                        counts.duplicates,
                        counts.rejected
                    );
                }
            }
        }
    }

    fn finish(&self) {
        if let Progress::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}
