//! The one error type of the HTTP API. Every error code maps to its status in
//! one table ([`ErrorCode::status`]), and every error leaves as
//! `{"error": {"code", "message", "field"}}`. Internal details are logged by
//! the caller, never put in a response.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use tandem_core::collect::{RejectionCode, RequestError};

/// Stable, machine-readable error codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    InvalidJson,
    InvalidRequest,
    MissingField,
    InvalidType,
    InvalidValue,
    InvalidEncoding,
    MissingWriteKey,
    InvalidWriteKey,
    RequestTooLarge,
    MessageTooLarge,
    TooManyMessages,
    NotFound,
    ProfileNotFound,
    InvalidIdentifier,
    InvalidMapping,
    InvalidRule,
    AudienceNotFound,
    AudienceExists,
    AudienceInUse,
    InvalidComputedTrait,
    ComputedTraitNotFound,
    ComputedTraitExists,
    ComputedTraitInUse,
    DestinationNotFound,
    DestinationExists,
    InvalidDestination,
    InvalidGoal,
    GoalNotFound,
    GoalExists,
    InvalidPlan,
    PlanNotFound,
    UnplannedEvent,
    PlanViolation,
    Suppressed,
    RedValueRefused,
    InvalidPiiRule,
    PiiRuleNotFound,
    MalformedFile,
    SourceNotFound,
    ImportNotFound,
    InvalidSignature,
    InvalidVerifyToken,
    MissingToken,
    InvalidToken,
    TokenExpired,
    PermissionDenied,
    InvalidCsrfToken,
    RouteNotPermitted,
    MethodNotAllowed,
    RequestTimeout,
    Unavailable,
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::MissingField => "missing_field",
            ErrorCode::InvalidType => "invalid_type",
            ErrorCode::InvalidValue => "invalid_value",
            ErrorCode::InvalidEncoding => "invalid_encoding",
            ErrorCode::MissingWriteKey => "missing_write_key",
            ErrorCode::InvalidWriteKey => "invalid_write_key",
            ErrorCode::RequestTooLarge => "request_too_large",
            ErrorCode::MessageTooLarge => "message_too_large",
            ErrorCode::TooManyMessages => "too_many_messages",
            ErrorCode::NotFound => "not_found",
            ErrorCode::ProfileNotFound => "profile_not_found",
            ErrorCode::InvalidIdentifier => "invalid_identifier",
            ErrorCode::InvalidMapping => "invalid_mapping",
            ErrorCode::InvalidRule => "invalid_rule",
            ErrorCode::AudienceNotFound => "audience_not_found",
            ErrorCode::AudienceExists => "audience_exists",
            ErrorCode::AudienceInUse => "audience_in_use",
            ErrorCode::InvalidComputedTrait => "invalid_computed_trait",
            ErrorCode::ComputedTraitNotFound => "computed_trait_not_found",
            ErrorCode::ComputedTraitExists => "computed_trait_exists",
            ErrorCode::ComputedTraitInUse => "computed_trait_in_use",
            ErrorCode::DestinationNotFound => "destination_not_found",
            ErrorCode::DestinationExists => "destination_exists",
            ErrorCode::InvalidDestination => "invalid_destination",
            ErrorCode::InvalidGoal => "invalid_goal",
            ErrorCode::GoalNotFound => "goal_not_found",
            ErrorCode::GoalExists => "goal_exists",
            ErrorCode::InvalidPlan => "invalid_plan",
            ErrorCode::PlanNotFound => "plan_not_found",
            ErrorCode::UnplannedEvent => "unplanned_event",
            ErrorCode::PlanViolation => "plan_violation",
            ErrorCode::Suppressed => "suppressed",
            ErrorCode::RedValueRefused => "red_value_refused",
            ErrorCode::InvalidPiiRule => "invalid_pii_rule",
            ErrorCode::PiiRuleNotFound => "pii_rule_not_found",
            ErrorCode::MalformedFile => "malformed_file",
            ErrorCode::SourceNotFound => "source_not_found",
            ErrorCode::ImportNotFound => "import_not_found",
            ErrorCode::InvalidSignature => "invalid_signature",
            ErrorCode::InvalidVerifyToken => "invalid_verify_token",
            ErrorCode::MissingToken => "missing_token",
            ErrorCode::InvalidToken => "invalid_token",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::InvalidCsrfToken => "invalid_csrf_token",
            ErrorCode::RouteNotPermitted => "route_not_permitted",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::RequestTimeout => "request_timeout",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }

    /// The status table: the only place a code meets its HTTP status.
    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::InvalidJson
            | ErrorCode::InvalidRequest
            | ErrorCode::MissingField
            | ErrorCode::InvalidType
            | ErrorCode::InvalidValue
            | ErrorCode::InvalidEncoding
            | ErrorCode::InvalidIdentifier
            | ErrorCode::MalformedFile => StatusCode::BAD_REQUEST,
            ErrorCode::MissingWriteKey
            | ErrorCode::InvalidWriteKey
            | ErrorCode::MissingToken
            | ErrorCode::InvalidToken
            | ErrorCode::TokenExpired
            | ErrorCode::InvalidSignature => StatusCode::UNAUTHORIZED,
            ErrorCode::NotFound
            | ErrorCode::ProfileNotFound
            | ErrorCode::SourceNotFound
            | ErrorCode::ImportNotFound
            | ErrorCode::AudienceNotFound
            | ErrorCode::ComputedTraitNotFound
            | ErrorCode::DestinationNotFound
            | ErrorCode::GoalNotFound
            | ErrorCode::PlanNotFound
            | ErrorCode::PiiRuleNotFound => StatusCode::NOT_FOUND,
            ErrorCode::InvalidMapping
            | ErrorCode::InvalidRule
            | ErrorCode::InvalidComputedTrait
            | ErrorCode::InvalidDestination
            | ErrorCode::InvalidGoal
            | ErrorCode::InvalidPlan
            | ErrorCode::UnplannedEvent
            | ErrorCode::PlanViolation
            | ErrorCode::RedValueRefused
            | ErrorCode::InvalidPiiRule => StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::AudienceExists
            | ErrorCode::AudienceInUse
            | ErrorCode::ComputedTraitExists
            | ErrorCode::ComputedTraitInUse
            | ErrorCode::DestinationExists
            | ErrorCode::GoalExists => StatusCode::CONFLICT,
            ErrorCode::InvalidVerifyToken
            | ErrorCode::PermissionDenied
            | ErrorCode::InvalidCsrfToken
            | ErrorCode::RouteNotPermitted
            | ErrorCode::Suppressed => StatusCode::FORBIDDEN,
            ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ErrorCode::RequestTooLarge | ErrorCode::MessageTooLarge | ErrorCode::TooManyMessages => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<RejectionCode> for ErrorCode {
    fn from(code: RejectionCode) -> Self {
        match code {
            RejectionCode::InvalidJson => ErrorCode::InvalidJson,
            RejectionCode::MissingField => ErrorCode::MissingField,
            RejectionCode::InvalidType => ErrorCode::InvalidType,
            RejectionCode::InvalidValue => ErrorCode::InvalidValue,
            RejectionCode::MessageTooLarge => ErrorCode::MessageTooLarge,
            RejectionCode::UnplannedEvent => ErrorCode::UnplannedEvent,
            RejectionCode::PlanViolation => ErrorCode::PlanViolation,
            RejectionCode::Suppressed => ErrorCode::Suppressed,
            RejectionCode::RedValueRefused => ErrorCode::RedValueRefused,
        }
    }
}

/// An API error: a code, a message for people, the field at fault, and
/// optional extra members for the body (such as a batch's `rejected` list).
#[derive(Debug)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    pub field: Option<String>,
    pub extra: Option<(&'static str, Value)>,
    /// Also put `code` and `message` at the top level of the body.
    pub top_level_code: bool,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError { code, message: message.into(), field: None, extra: None, top_level_code: false }
    }

    /// Repeats `code` and `message` at the top level, beside the `error`
    /// object, as the tracking API answers: Segment's older libraries
    /// (`analytics-python`) read them there, and without them take a
    /// permanent refusal for a transient one and retry it.
    pub fn with_top_level_code(mut self) -> Self {
        self.top_level_code = true;
        self
    }

    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    pub fn with_extra(mut self, key: &'static str, value: Value) -> Self {
        self.extra = Some((key, value));
        self
    }

    pub fn unavailable() -> Self {
        ApiError::new(ErrorCode::Unavailable, "the event log cannot accept events right now, retry later")
    }

    pub fn status(&self) -> StatusCode {
        self.code.status()
    }
}

impl From<RequestError> for ApiError {
    fn from(error: RequestError) -> Self {
        let code = match error {
            RequestError::InvalidJson(_) => ErrorCode::InvalidJson,
            RequestError::TooManyMessages(_) => ErrorCode::TooManyMessages,
            RequestError::NotAnObject
            | RequestError::MissingBatch
            | RequestError::BatchNotArray
            | RequestError::InvalidEnvelopeField { .. } => ErrorCode::InvalidRequest,
        };
        let field = error.field();
        let api_error = ApiError::new(code, error.to_string());
        match field {
            Some(field) => api_error.with_field(field),
            None => api_error,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({
            "error": {"code": self.code.as_str(), "message": self.message, "field": self.field}
        });
        if self.top_level_code {
            body["code"] = json!(self.code.as_str());
            body["message"] = json!(self.message);
        }
        if let Some((key, value)) = self.extra {
            body[key] = value;
        }
        (self.code.status(), Json(body)).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_request_error_is_a_client_error_naming_its_field() {
        let too_many: ApiError = RequestError::TooManyMessages(3000).into();
        assert_eq!(too_many.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(too_many.field.as_deref(), Some("batch"));
        let bad_json: ApiError = RequestError::InvalidJson("eof".into()).into();
        assert_eq!(bad_json.status(), StatusCode::BAD_REQUEST);
        assert_eq!(bad_json.code, ErrorCode::InvalidJson);
    }

    #[test]
    fn message_rejections_map_to_400_or_413() {
        assert_eq!(ErrorCode::from(RejectionCode::MissingField).status(), StatusCode::BAD_REQUEST);
        assert_eq!(ErrorCode::from(RejectionCode::MessageTooLarge).status(), StatusCode::PAYLOAD_TOO_LARGE);
    }
}
