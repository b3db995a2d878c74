//! The one place where errors become HTTP: every failure of the API is an [`ApiError`], rendered
//! as OpenAI's envelope `{"error": {"message", "type", "param", "code"}}`.
//!
//! | cause | status | `type` | `code` |
//! |---|---|---|---|
//! | invalid field, bad messages/prompt, sampling error (`param` = the field) | 400 | `invalid_request_error` | null |
//! | prompt or prompt + `max_tokens` too long, or larger than the KV cache | 400 | `invalid_request_error` | `context_length_exceeded` |
//! | malformed JSON / wrong field types | 400 | `invalid_request_error` | `invalid_json` |
//! | missing or wrong API key | 401 | `invalid_request_error` | `invalid_api_key` |
//! | unknown model | 404 | `invalid_request_error` | `model_not_found` |
//! | unknown route / method | 404 / 405 | `invalid_request_error` | `not_found` / `method_not_allowed` |
//! | body over the limit | 413 | `invalid_request_error` | `request_too_large` |
//! | body not `application/json` | 415 | `invalid_request_error` | `unsupported_media_type` |
//! | service overloaded | 429 + `Retry-After` | `rate_limit_error` | `overloaded` |
//! | no workers / engine failed / shutting down / not serving | 503 + `Retry-After` | `server_error` | `service_unavailable` |
//! | request aborted by a worker failure | 500 (or an SSE error event) | `server_error` | `generation_aborted` |
//!
//! Client mistakes are always 4xx; 5xx means the server could not do a valid request.

use super::openai::{ErrorBody, ErrorObject};
use super::service::ServiceError;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use herd_worker::engine::request::Rejection;
use herd_worker::engine::sampler::SamplingError;
use serde::de::DeserializeOwned;

pub const INVALID_REQUEST: &str = "invalid_request_error";
pub const SERVER_ERROR: &str = "server_error";
pub const CONTEXT_LENGTH_EXCEEDED: &str = "context_length_exceeded";

/// An error response: status, OpenAI error object, and a `Retry-After` when retrying helps.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `type`.
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    pub retry_after_s: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), kind, param: None, code: None, retry_after_s: None }
    }

    /// 400 about `param` (None when no single field is at fault).
    pub fn invalid(param: Option<&str>, message: impl Into<String>) -> Self {
        Self { param: param.map(str::to_owned), ..Self::new(StatusCode::BAD_REQUEST, INVALID_REQUEST, message) }
    }

    /// 400 `context_length_exceeded`.
    pub fn context_length(param: &str, message: impl Into<String>) -> Self {
        Self { code: Some(CONTEXT_LENGTH_EXCEEDED), ..Self::invalid(Some(param), message) }
    }

    pub fn model_not_found(model: &str) -> Self {
        Self {
            param: Some("model".into()),
            code: Some("model_not_found"),
            ..Self::new(StatusCode::NOT_FOUND, INVALID_REQUEST, format!("The model `{model}` does not exist."))
        }
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self { code: Some("invalid_api_key"), ..Self::new(StatusCode::UNAUTHORIZED, INVALID_REQUEST, message) }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self { code: Some("not_found"), ..Self::new(StatusCode::NOT_FOUND, INVALID_REQUEST, message) }
    }

    pub fn method_not_allowed() -> Self {
        Self {
            code: Some("method_not_allowed"),
            ..Self::new(StatusCode::METHOD_NOT_ALLOWED, INVALID_REQUEST, "method not allowed on this route")
        }
    }

    pub fn overloaded(retry_after_s: u64) -> Self {
        Self {
            code: Some("overloaded"),
            retry_after_s: Some(retry_after_s),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "the server is overloaded with requests; retry later",
            )
        }
    }

    pub fn unavailable(reason: &str, retry_after_s: u64) -> Self {
        Self {
            code: Some("service_unavailable"),
            retry_after_s: Some(retry_after_s),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, SERVER_ERROR, format!("the service is unavailable: {reason}"))
        }
    }

    /// A request that ran but ended without finishing (a worker failed mid-generation).
    pub fn aborted(reason: &str) -> Self {
        Self {
            code: Some("generation_aborted"),
            ..Self::new(StatusCode::INTERNAL_SERVER_ERROR, SERVER_ERROR, format!("the request was aborted: {reason}"))
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self { code: Some("internal_error"), ..Self::new(StatusCode::INTERNAL_SERVER_ERROR, SERVER_ERROR, message) }
    }

    /// The envelope, also sent as an SSE event when a stream fails after its headers.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorObject {
                message: self.message.clone(),
                kind: self.kind.to_owned(),
                param: self.param.clone(),
                code: self.code.map(str::to_owned),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(seconds) = self.retry_after_s {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

impl From<SamplingError> for ApiError {
    fn from(e: SamplingError) -> Self {
        ApiError::invalid(Some(e.field()), e.to_string())
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::Overloaded { retry_after_s } => ApiError::overloaded(retry_after_s),
            ServiceError::Unavailable { reason, retry_after_s } => ApiError::unavailable(&reason, retry_after_s),
            ServiceError::Rejected(rejection) => rejection.into(),
        }
    }
}

impl From<Rejection> for ApiError {
    fn from(r: Rejection) -> Self {
        let message = r.to_string();
        match r {
            Rejection::EmptyPrompt => ApiError::invalid(Some("prompt"), message),
            Rejection::TokenOutOfRange { .. } => ApiError::invalid(Some("prompt"), message),
            Rejection::InvalidParams { field, .. } => ApiError::invalid(Some(&field), message),
            Rejection::TooLarge { .. } => ApiError::context_length("max_tokens", message),
            Rejection::ShuttingDown | Rejection::NotServing => ApiError::unavailable(&message, 5),
            Rejection::DuplicateId(_) => ApiError::internal(message),
            Rejection::NoVision | Rejection::ImageTokens { .. } | Rejection::BadImage { .. } => {
                ApiError::invalid(Some("messages"), message)
            }
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        let message = r.body_text();
        match r {
            JsonRejection::JsonDataError(_) => {
                let param = json_error_path(&message);
                Self { code: Some("invalid_json"), ..ApiError::invalid(param.as_deref(), message) }
            }
            JsonRejection::JsonSyntaxError(_) => {
                Self { code: Some("invalid_json"), ..ApiError::invalid(None, message) }
            }
            JsonRejection::MissingJsonContentType(_) => Self {
                code: Some("unsupported_media_type"),
                ..Self::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    INVALID_REQUEST,
                    "expected a request body with `Content-Type: application/json`",
                )
            },
            other => {
                let status = other.status();
                if status == StatusCode::PAYLOAD_TOO_LARGE {
                    Self { code: Some("request_too_large"), ..Self::new(status, INVALID_REQUEST, message) }
                } else if status.is_client_error() {
                    Self::new(status, INVALID_REQUEST, message)
                } else {
                    ApiError::internal(message)
                }
            }
        }
    }
}

/// The field a type error is about: axum reports `...target type: {path}: {serde error}`.
fn json_error_path(message: &str) -> Option<String> {
    let rest = message.strip_prefix("Failed to deserialize the JSON body into the target type: ")?;
    let (path, _) = rest.split_once(": ")?;
    let named = path.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_');
    (named && !path.contains(' ')).then(|| path.to_owned())
}

/// `axum::Json`, with its rejections in the OpenAI envelope.
#[derive(Debug)]
pub struct Json<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(Json(value)),
            Err(rejection) => Err(rejection.into()),
        }
    }
}
