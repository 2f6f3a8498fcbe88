//! `tandem dsr`: carry out a data subject request about the person holding
//! an identifier — `access` prints everything kept about them as JSON,
//! `delete` erases them from every table, `suppress` / `unsuppress` refuse or
//! accept again their future events — and list past requests with their
//! status. Works on the data directory directly; a running server sees a
//! suppression within 10 seconds. With an event stream (`--log nats://…`) a
//! deletion erases the person from the stream too.

use anyhow::Context;
use serde_json::Value;
use std::io::Write;
use std::sync::Arc;
use tandem_core::govern::dsr::DsrKind;
use tandem_server::dsr::{request_json, run_request, run_request_reaching, StreamCopies};
use tandem_store::Store;

pub fn run(store: Arc<dyn Store>, kind: DsrKind, subject: &str, out: &mut impl Write) -> anyhow::Result<()> {
    let outcome = run_request(store.as_ref(), kind, subject)?;
    print(kind, outcome, out)
}

/// `tandem dsr delete`: from the store, and from the event stream when one is configured.
pub fn delete(
    store: Arc<dyn Store>,
    subject: &str,
    log: Option<&tandem_server::stream::StreamOptions>,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let Some(log) = log else { return run(store, DsrKind::Delete, subject, out) };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let stream = runtime.block_on(tandem_server::stream::EventStream::connect(log))?;
    let copies = StreamCopies { stream: &stream, runtime: runtime.handle() };
    let outcome = run_request_reaching(store.as_ref(), DsrKind::Delete, subject, Some(copies))?;
    print(DsrKind::Delete, outcome, out)
}

fn print(
    kind: DsrKind,
    (request, export): (tandem_store::DsrRecord, Option<Value>),
    out: &mut impl Write,
) -> anyhow::Result<()> {
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
