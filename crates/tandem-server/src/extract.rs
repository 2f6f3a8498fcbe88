//! The extractors every admin and webhook handler takes its input through, so
//! that each refusal leaves through the one error table as JSON with the field
//! named, never as the web framework's own `text/plain` rejection.
//!
//! [`AdminToken`] goes first in a handler's arguments: axum runs extractors in
//! order, so a request without a valid token is answered `401` before its
//! path, query or body is looked at.

use crate::error::{ApiError, ErrorCode};
use crate::AppState;
use axum::extract::multipart::MultipartRejection;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, MatchedPath, Multipart, Path, Query, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use tandem_core::govern::{Permission, Role};

/// A verified admin bearer token (`Authorization: Bearer TOKEN`) whose role
/// holds the permission the route requires ([`crate::access`]): `401`
/// without a valid token, `403` naming the permission otherwise.
pub struct AdminToken(pub tandem_store::TokenInfo);

impl AdminToken {
    pub fn role(&self) -> Role {
        self.0.role
    }

    /// Whether this caller sees PII in clear; everyone else sees it masked.
    pub fn sees_pii(&self) -> bool {
        self.0.role.grants(Permission::PiiRead)
    }
}

impl FromRequestParts<AppState> for AdminToken {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = state.tokens.authenticate(&parts.headers).await?;
        let Some(route) = parts.extensions.get::<MatchedPath>() else {
            tracing::error!(path = %parts.uri.path(), "an admin handler was reached without a matched route");
            return Err(ApiError::new(ErrorCode::RouteNotPermitted, "this route is in no permission table line")
                .with_field("permission"));
        };
        crate::access::authorize(token.role, parts.method.as_str(), route.as_str(), parts.uri.query())?;
        Ok(AdminToken(token))
    }
}

/// Path parameters, refused as `400` JSON naming the parameter.
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::<T>::from_request_parts(parts, state).await.map(|Path(value)| ApiPath(value)).map_err(path_error)
    }
}

fn path_error(rejection: PathRejection) -> ApiError {
    use axum::extract::path::ErrorKind;
    let PathRejection::FailedToDeserializePathParams(error) = rejection else {
        tracing::error!(%rejection, "a route's path parameters do not match its handler");
        return ApiError::new(ErrorCode::Internal, "internal error");
    };
    match error.into_kind() {
        ErrorKind::InvalidUtf8InPathParam { key } => {
            ApiError::new(ErrorCode::InvalidValue, format!("{key} is not valid utf-8 once percent-decoded"))
                .with_field(key)
        }
        ErrorKind::ParseErrorAtKey { key, expected_type, .. } => {
            ApiError::new(ErrorCode::InvalidValue, format!("{key} must be {expected_type}")).with_field(key)
        }
        ErrorKind::DeserializeError { key, message, .. } => {
            ApiError::new(ErrorCode::InvalidValue, format!("{key} is invalid: {message}")).with_field(key)
        }
        other => ApiError::new(ErrorCode::InvalidValue, lowercase_first(&other.to_string())).with_field("path"),
    }
}

/// A query string, refused as `400` JSON naming the parameter at fault (a
/// value that does not parse, an empty or overflowing number, a parameter
/// given twice).
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Query::<T>::from_request_parts(parts, state).await.map(|Query(value)| ApiQuery(value)).map_err(query_error)
    }
}

fn query_error(rejection: QueryRejection) -> ApiError {
    // axum words it "Failed to deserialize query string: limit: invalid digit
    // found in string" or "…: duplicate field `identifier`".
    let text = rejection.body_text();
    let detail = text.split_once(": ").map_or(text.as_str(), |(_, detail)| detail);
    let field = match detail.split_once("`") {
        Some((_, rest)) if detail.starts_with("duplicate field") || detail.starts_with("missing field") => {
            rest.split('`').next().unwrap_or("query").to_owned()
        }
        _ => match detail.split_once(": ") {
            Some((key, _)) if key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.') => key.to_owned(),
            _ => "query".to_owned(),
        },
    };
    ApiError::new(ErrorCode::InvalidValue, format!("the query string is invalid: {}", lowercase_first(detail)))
        .with_field(field)
}

/// A `multipart/form-data` body; anything else is `400` JSON naming the
/// content type.
pub struct ApiMultipart(pub Multipart);

impl<S: Send + Sync> FromRequest<S> for ApiMultipart {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        Multipart::from_request(request, state).await.map(ApiMultipart).map_err(|rejection: MultipartRejection| {
            ApiError::new(
                ErrorCode::InvalidRequest,
                format!(
                    "the body must be multipart/form-data with a boundary: {}",
                    lowercase_first(&rejection.body_text())
                ),
            )
            .with_field("content-type")
        })
    }
}

fn lowercase_first(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Request as HttpRequest;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Page {
        limit: Option<usize>,
        identifier: Option<String>,
    }

    async fn query(uri: &str) -> Result<Page, ApiError> {
        let (mut parts, ()) = HttpRequest::builder().uri(uri).body(()).unwrap().into_parts();
        ApiQuery::<Page>::from_request_parts(&mut parts, &()).await.map(|ApiQuery(page)| page)
    }

    #[tokio::test]
    async fn query_rejections_name_their_parameter() {
        for (uri, field) in [
            ("/?limit=abc", "limit"),
            ("/?limit=", "limit"),
            ("/?limit=99999999999999999999999", "limit"),
            ("/?identifier=a&identifier=b", "identifier"),
        ] {
            let error = query(uri).await.expect_err(uri);
            assert_eq!(error.code, ErrorCode::InvalidValue, "{uri}");
            assert_eq!(error.field.as_deref(), Some(field), "{uri}: {}", error.message);
        }
        assert_eq!(query("/?limit=5").await.unwrap().limit, Some(5));
    }
}
