//! `tandem dsr`: carry out a data subject request about the person holding
//! an identifier — `access` prints everything kept about them as JSON,
//! `delete` erases them from every table, `suppress` / `unsuppress` refuse or
//! accept again their future events — and list past requests with their
//! status. Works on the data directory directly; a running server sees a
//! suppression within 10 seconds. A deletion also removes the person's rows
//! from the reject files of imports made through the API. With an event stream (`--log`), a
//! deletion erases the person's messages from the stream too.

use serde_json::Value;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use tandem_core::govern::dsr::DsrKind;
use tandem_server::dsr::{request_json, run_request, Beyond, StreamEraser};
use tandem_server::stream::{EventStream, StreamOptions};
use tandem_store::Store;

pub fn run(
    store: Arc<dyn Store>,
    kind: DsrKind,
    subject: &str,
    log: Option<&StreamOptions>,
    import_dir: &Path,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    // Only a deletion touches the stream; the runtime drives its client.
    let runtime = match (kind, log) {
        (DsrKind::Delete, Some(_)) => Some(crate::runtime()?),
        _ => None,
    };
    let eraser = match (&runtime, log) {
        (Some(runtime), Some(log)) => Some(StreamEraser {
            stream: runtime.block_on(EventStream::connect(log))?,
            runtime: runtime.handle().clone(),
        }),
        _ => None,
    };
    let beyond = Beyond { stream: eraser.as_ref(), import_dir: Some(import_dir) };
    let (request, export) = run_request(store.as_ref(), kind, subject, &beyond)?;
    match export {
        Some(export) => writeln!(out, "{}", serde_json::to_string_pretty(&export)?)?,
        None => writeln!(
            out,
            "{} {} {}: {}",
            request.id,
            kind,
            request.status.as_str(),
            request.detail.as_deref().unwrap_or("")
        )?,
    }
    Ok(())
}

pub fn list(store: Arc<dyn Store>, limit: usize, as_json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    let requests = store.list_dsr(limit)?;
    if as_json {
        writeln!(out, "{}", Value::Array(requests.iter().map(request_json).collect()))?;
        return Ok(());
    }
    if requests.is_empty() {
        writeln!(out, "no data subject requests")?;
    }
    for request in &requests {
        let shown = request_json(request);
        writeln!(
            out,
            "{:<24} {:<10} {:<8} created {}  finished {}  subject sha256 {}…",
            request.id,
            request.kind,
            request.status.as_str(),
            shown["created_at"].as_str().unwrap_or(""),
            shown["finished_at"].as_str().unwrap_or("-"),
            &request.subject_digest[..request.subject_digest.len().min(12)],
        )?;
    }
    Ok(())
}
