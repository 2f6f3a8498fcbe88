//! Imports over HTTP: `POST /api/v1/imports` takes a multipart upload (the
//! file, its mapping, the source's name), spools the file to the import
//! directory, and runs the import in the background through the log writer,
//! like any tracking call. The answer is a job id; `GET /api/v1/imports/{id}`
//! shows its status and counts as it goes, `GET /api/v1/imports/{id}/rejects`
//! the refused rows. Job statuses live in memory: a restarted server has
//! forgotten them, while the rows they imported stay in the log.

use super::{reject_path_beside, run_import_until, FileFormat, ImportCounts, ImportRequest, RejectedRow};
use crate::error::{ApiError, ErrorCode};
use crate::extract::{AdminToken, ApiMultipart, ApiPath};
use crate::AppState;
use axum::extract::{DefaultBodyLimit, Multipart, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tandem_core::mapping::Mapping;
use tandem_store::StoreError;
use tokio::io::AsyncWriteExt;

/// The largest file one upload may carry.
pub const MAX_UPLOAD_BYTES: usize = 4 * 1024 * 1024 * 1024;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/imports", post(create_job).layer(DefaultBodyLimit::max(MAX_UPLOAD_BYTES)).get(list_jobs))
        .route("/api/v1/imports/{id}", get(job_status))
        .route("/api/v1/imports/{id}/rejects", get(job_rejects))
}

/// Where a job is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Running,
    Succeeded,
    Failed,
}

/// One import job as the API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct Job {
    pub id: String,
    pub source: String,
    pub file_name: String,
    pub format: FileFormat,
    pub status: JobStatus,
    pub counts: ImportCounts,
    /// Why the import stopped, when it failed.
    pub error: Option<String>,
    pub first_rejects: Vec<RejectedRow>,
    pub created_at: String,
    pub finished_at: Option<String>,
    #[serde(skip)]
    reject_file: Option<PathBuf>,
    /// Order of arrival on this server, for listing newest first.
    #[serde(skip)]
    sequence: u64,
}

/// The import jobs of this server and the directory their files go to.
pub struct ImportJobs {
    directory: PathBuf,
    jobs: Mutex<HashMap<String, Arc<Mutex<Job>>>>,
    /// Set on shutdown: running jobs stop within a row, new ones are refused.
    stopping: std::sync::atomic::AtomicBool,
}

impl ImportJobs {
    pub fn new(directory: PathBuf) -> Self {
        ImportJobs { directory, jobs: Mutex::new(HashMap::new()), stopping: Default::default() }
    }

    /// Where uploads are spooled and reject files written.
    pub fn directory(&self) -> &Path {
        &self.directory
    }

    /// Stops every running job promptly (each fails, saying it can be run
    /// again to finish) and refuses new ones; the server calls it on shutdown
    /// so that draining does not wait for a long import.
    pub fn stop_all(&self) {
        self.stopping.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    fn get(&self, id: &str) -> Option<Arc<Mutex<Job>>> {
        self.jobs.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).get(id).cloned()
    }

    /// Every job this server ran or runs, newest first.
    fn all(&self) -> Vec<Job> {
        let jobs: Vec<Arc<Mutex<Job>>> =
            self.jobs.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).values().cloned().collect();
        let mut jobs: Vec<Job> = jobs.iter().map(|job| lock(job).clone()).collect();
        jobs.sort_by_key(|job| std::cmp::Reverse(job.sequence));
        jobs
    }

    /// The newest `limit` jobs, newest first (the console's list).
    pub fn recent(&self, limit: usize) -> Vec<Job> {
        let mut jobs = self.all();
        jobs.truncate(limit);
        jobs
    }

    fn insert(&self, mut job: Job) -> Arc<Mutex<Job>> {
        let mut jobs = self.jobs.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        job.sequence = jobs.len() as u64;
        let id = job.id.clone();
        let job = Arc::new(Mutex::new(job));
        jobs.insert(id, job.clone());
        job
    }
}

fn lock(job: &Mutex<Job>) -> std::sync::MutexGuard<'_, Job> {
    job.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn now() -> String {
    tandem_core::event::format_timestamp(chrono::Utc::now())
}

fn missing(field: &str) -> ApiError {
    ApiError::new(ErrorCode::MissingField, format!("the {field} part is required")).with_field(field)
}

fn bad_upload(error: impl std::fmt::Display) -> ApiError {
    ApiError::new(ErrorCode::InvalidRequest, format!("the upload could not be read: {error}")).with_field("body")
}

fn not_found(id: &str) -> ApiError {
    ApiError::new(ErrorCode::ImportNotFound, format!("no import job {id}")).with_field("id")
}

fn job_json(job: &Job) -> Value {
    serde_json::to_value(job).unwrap_or(Value::Null)
}

/// The multipart body of `POST /api/v1/imports`, for the document:
/// [`read_upload`] reads the parts as they stream, spooling the file to disk.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub(crate) struct ImportUpload {
    /// The export: CSV with a header line or JSON Lines, either may be gzipped.
    #[schema(value_type = String, format = Binary)]
    file: Vec<u8>,
    /// The mapping, as TOML text.
    mapping: String,
    /// The name of the source the rows arrive through.
    source: String,
    /// `csv` or `jsonl`; from the file's name when absent.
    format: Option<FileFormat>,
}

/// The parts of an upload, the file already spooled to disk.
struct Upload {
    source: Option<String>,
    mapping: Option<String>,
    format: Option<String>,
    file: Option<(String, PathBuf)>,
}

async fn read_upload(multipart: &mut Multipart, spool: PathBuf) -> Result<Upload, ApiError> {
    let mut upload = Upload { source: None, mapping: None, format: None, file: None };
    while let Some(mut field) = multipart.next_field().await.map_err(bad_upload)? {
        let name = field.name().unwrap_or_default().to_owned();
        match name.as_str() {
            "file" => {
                let file_name = field.file_name().unwrap_or("upload").to_owned();
                let mut file = tokio::fs::File::create(&spool).await.map_err(|error| {
                    tracing::error!(%error, path = %spool.display(), "cannot spool an import");
                    ApiError::new(ErrorCode::Unavailable, "the upload cannot be stored right now")
                })?;
                while let Some(chunk) = field.chunk().await.map_err(bad_upload)? {
                    file.write_all(&chunk).await.map_err(|error| {
                        tracing::error!(%error, "spooling an import failed");
                        ApiError::new(ErrorCode::Unavailable, "the upload cannot be stored right now")
                    })?;
                }
                file.flush().await.map_err(bad_upload)?;
                upload.file = Some((file_name, spool.clone()));
            }
            "source" | "mapping" | "format" => {
                let text = field.text().await.map_err(bad_upload)?;
                let slot = match name.as_str() {
                    "source" => &mut upload.source,
                    "mapping" => &mut upload.mapping,
                    _ => &mut upload.format,
                };
                *slot = Some(text);
            }
            other => {
                return Err(ApiError::new(
                    ErrorCode::InvalidRequest,
                    format!("unknown part {other:?}; send file, mapping, source and optionally format"),
                )
                .with_field(other.to_owned()))
            }
        }
    }
    Ok(upload)
}

async fn create_job(
    State(state): State<AppState>,
    _token: AdminToken,
    ApiMultipart(mut multipart): ApiMultipart,
) -> Result<Response, ApiError> {
    let id = format!("imp_{}", uuid::Uuid::new_v4().simple());
    let directory = state.imports.directory.clone();
    tokio::fs::create_dir_all(&directory).await.map_err(|error| {
        tracing::error!(%error, path = %directory.display(), "cannot create the import directory");
        ApiError::new(ErrorCode::Unavailable, "the upload cannot be stored right now")
    })?;
    let spool = directory.join(format!("{id}.upload"));
    let upload = read_upload(&mut multipart, spool.clone()).await;
    let started = prepare(&state, &id, upload).await;
    if started.is_err() {
        let _ = tokio::fs::remove_file(&spool).await;
    }
    let (job, request_parts) = started?;
    let job_view = job_json(&lock(&job));
    tokio::task::spawn_blocking(move || run_job(state, job, request_parts));
    Ok((StatusCode::ACCEPTED, [(header::LOCATION, format!("/api/v1/imports/{id}"))], Json(job_view)).into_response())
}

/// What a job needs to run, checked before it is accepted.
struct JobParts {
    source: tandem_core::Source,
    mapping: Mapping,
    format: FileFormat,
    spool: PathBuf,
    reject_path: PathBuf,
    /// Governance for the job's rows, read as it starts.
    gate: crate::govern::Gate,
}

async fn prepare(
    state: &AppState,
    id: &str,
    upload: Result<Upload, ApiError>,
) -> Result<(Arc<Mutex<Job>>, JobParts), ApiError> {
    let upload = upload?;
    if state.imports.stopping.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(ApiError::new(ErrorCode::Unavailable, "the server is shutting down; upload again once it is back"));
    }
    let (file_name, spool) = upload.file.ok_or_else(|| missing("file"))?;
    let mapping_text = upload.mapping.ok_or_else(|| missing("mapping"))?;
    let source_name = upload.source.ok_or_else(|| missing("source"))?;
    let mapping = Mapping::from_toml(&mapping_text).map_err(|error| {
        ApiError::new(ErrorCode::InvalidMapping, error.to_string()).with_field(format!("mapping.{}", error.field))
    })?;
    let format = match upload.format.as_deref() {
        Some(name) => FileFormat::parse(name).ok_or_else(|| {
            ApiError::new(ErrorCode::InvalidValue, format!("format {name:?} is not csv or jsonl")).with_field("format")
        })?,
        None => FileFormat::from_path(std::path::Path::new(&file_name)).ok_or_else(|| {
            ApiError::new(ErrorCode::MissingField, format!("cannot tell the format of {file_name:?}; send format"))
                .with_field("format")
        })?,
    };
    let store = state.store.clone();
    let lookup = source_name.clone();
    let source = tokio::task::spawn_blocking(move || store.source_by_name(&lookup))
        .await
        .map_err(|_| ApiError::new(ErrorCode::Internal, "internal error"))?
        .map_err(|error| match error {
            StoreError::SourceNotFound(name) => {
                ApiError::new(ErrorCode::SourceNotFound, format!("no source named {name:?}")).with_field("source")
            }
            other => {
                tracing::error!(error = %other, "source lookup failed");
                ApiError::unavailable()
            }
        })?;
    let checked_mapping = mapping.clone();
    let checked_spool = spool.clone();
    let checked = tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&checked_spool)
            .map_err(|source| super::ImportError::Open { path: checked_spool.clone(), source })?;
        super::preflight(file, format, &checked_mapping)
    })
    .await
    .map_err(|_| ApiError::new(ErrorCode::Internal, "internal error"))?;
    match checked {
        Ok(()) => {}
        Err(error @ super::ImportError::MissingColumns(_)) => {
            return Err(ApiError::new(ErrorCode::InvalidMapping, error.to_string()).with_field("mapping"))
        }
        Err(error @ super::ImportError::Malformed { .. }) => {
            return Err(ApiError::new(ErrorCode::MalformedFile, error.to_string()).with_field("file"))
        }
        Err(error) => {
            tracing::error!(%error, "cannot read a spooled import");
            return Err(ApiError::unavailable());
        }
    }
    let reject_path = reject_path_beside(&state.imports.directory.join(id), format);
    let gate = crate::govern::Gate::for_source(state, &source.id).await?;
    let job = state.imports.insert(Job {
        id: id.to_owned(),
        source: source.name.clone(),
        file_name,
        format,
        status: JobStatus::Running,
        counts: ImportCounts::default(),
        error: None,
        first_rejects: Vec::new(),
        created_at: now(),
        finished_at: None,
        reject_file: None,
        sequence: 0,
    });
    Ok((job, JobParts { source, mapping, format, spool, reject_path, gate }))
}

/// Runs on the blocking pool; appends through the log writer.
fn run_job(state: AppState, job: Arc<Mutex<Job>>, parts: JobParts) {
    let outcome = std::fs::File::open(&parts.spool)
        .map_err(|source| super::ImportError::Open { path: parts.spool.clone(), source });
    let outcome = outcome.and_then(|file| {
        let request = ImportRequest {
            source: &parts.source,
            mapping: &parts.mapping,
            format: parts.format,
            input: Box::new(file),
            reject_path: parts.reject_path.clone(),
            gate: &parts.gate,
        };
        let progress_job = job.clone();
        run_import_until(
            request,
            &mut state.log.clone(),
            &mut |counts| lock(&progress_job).counts = *counts,
            &state.imports.stopping,
        )
    });
    let _ = std::fs::remove_file(&parts.spool);
    let mut job = lock(&job);
    job.finished_at = Some(now());
    match outcome {
        Ok(summary) => {
            state.metrics.count_events("stored", summary.counts.imported);
            state.metrics.count_events("duplicate", summary.counts.duplicates);
            state.metrics.count_events("rejected", summary.counts.quarantined);
            job.status = JobStatus::Succeeded;
            job.counts = summary.counts;
            job.first_rejects = summary.first_rejects;
            job.reject_file = summary.reject_file;
        }
        Err(error) => {
            if matches!(error, super::ImportError::Stopped { .. }) {
                tracing::warn!(job = %job.id, %error, "import job stopped by shutdown");
            }
            job.status = JobStatus::Failed;
            job.error = Some(error.to_string());
        }
    }
    tracing::info!(job = %job.id, status = ?job.status, rows = job.counts.rows_read, "import job finished");
}

async fn job_status(
    State(state): State<AppState>,
    _token: AdminToken,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let job = state.imports.get(&id).ok_or_else(|| not_found(&id))?;
    let view = job_json(&lock(&job));
    Ok(Json(view))
}

/// Jobs as a list: each as its status shows it, without the sample of
/// rejected rows (`GET /api/v1/imports/{id}` has them).
fn job_summary_json(job: &Job) -> Value {
    let mut view = job_json(job);
    if let Some(object) = view.as_object_mut() {
        object.remove("first_rejects");
    }
    view
}

async fn list_jobs(State(state): State<AppState>, _token: AdminToken) -> Result<Json<Value>, ApiError> {
    let jobs: Vec<Value> = state.imports.all().iter().map(job_summary_json).collect();
    Ok(Json(serde_json::json!({ "imports": jobs })))
}

async fn job_rejects(
    State(state): State<AppState>,
    token: AdminToken,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let job = state.imports.get(&id).ok_or_else(|| not_found(&id))?;
    let (path, format) = {
        let job = lock(&job);
        (job.reject_file.clone(), job.format)
    };
    let content_type = match format {
        FileFormat::Csv => "text/csv; charset=utf-8",
        FileFormat::Jsonl => "application/x-ndjson",
    };
    let body = match path {
        Some(path) => tokio::fs::read(&path).await.map_err(|error| {
            tracing::error!(%error, path = %path.display(), "cannot read a reject file");
            ApiError::unavailable()
        })?,
        None => Vec::new(),
    };
    // Refused rows are echoed as they were in the file, PII and all.
    if !body.is_empty() {
        crate::audit::record(&state, &token, "import.read_rejects", &id, None, None).await;
    }
    Ok(([(header::CONTENT_TYPE, content_type)], body).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_job_shows_its_counts_but_not_its_files() {
        let job = Job {
            id: "imp_1".into(),
            source: "orders".into(),
            file_name: "orders.csv".into(),
            format: FileFormat::Csv,
            status: JobStatus::Running,
            counts: ImportCounts { rows_read: 3, ..ImportCounts::default() },
            error: None,
            first_rejects: Vec::new(),
            created_at: now(),
            finished_at: None,
            reject_file: Some(PathBuf::from("/secret/place")),
            sequence: 0,
        };
        let view = job_json(&job);
        assert!(job_summary_json(&job).get("first_rejects").is_none());
        assert_eq!(view["status"], json!("running"));
        assert_eq!(view["counts"]["rows_read"], json!(3));
        assert!(view.get("reject_file").is_none());
    }
}
