//! Every error a client can see, with its status code and machine-readable code, mapped in
//! one place. Handlers return `ApiError`; nothing else in the server builds an error response.

use crate::server::WorkerError;
use axum::extract::rejection::JsonRejection;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    MalformedJson(String),
    #[error("{0}")]
    MalformedMultipart(String),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    HostNotAllowed(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{message}")]
    RateLimited { message: String, retry_after_s: u64 },
    #[error("{0}")]
    RequestTimeout(String),
    #[error("{0}")]
    NotAcceptable(String),
    #[error("{0}")]
    InvalidSize(String),
    #[error("{0}")]
    InvalidSteps(String),
    #[error("{0}")]
    InvalidGuidanceScale(String),
    #[error("{0}")]
    InvalidImageGuidanceScale(String),
    #[error("{0}")]
    InvalidStrength(String),
    #[error("{0}")]
    InvalidAdapterScale(String),
    #[error("{0}")]
    InvalidOutputFormat(String),
    #[error("{0}")]
    GenerationNotFound(String),
    #[error("{0}")]
    EvaluationNotFound(String),
    #[error("{0}")]
    EvaluationNotFinished(String),
    #[error("{0}")]
    UnknownReward(String),
    #[error("{0}")]
    GenerationCancelled(String),
    #[error("{0}")]
    RequestIdInUse(String),
    #[error("{0}")]
    TooManyImages(String),
    #[error("{0}")]
    UnknownScheduler(String),
    #[error("{0}")]
    UnknownMode(String),
    #[error("{0}")]
    UnsupportedMode(String),
    #[error("{0}")]
    InvalidImage(String),
    #[error("{0}")]
    ImageTooLarge(String),
    #[error("{0}")]
    InvalidAdapter(String),
    #[error("{0}")]
    InvalidJob(String),
    #[error("{0}")]
    JobNotFound(String),
    #[error("{0}")]
    AdapterExists(String),
    #[error("{0}")]
    JobFinished(String),
    #[error("{0}")]
    ModelNotFound(String),
    #[error("{0}")]
    AdapterNotFound(String),
    #[error("{0}")]
    RouteNotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{message}")]
    QueueFull { message: String, retry_after_s: u64 },
    #[error("{message}")]
    ModelLoading { message: String, retry_after_s: u64 },
    #[error("{0}")]
    ModelUnavailable(String),
    #[error("{0}")]
    StorageUnavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// The machine-readable code; also the value of `error.code` in the body.
    pub fn code(&self) -> &'static str {
        use ApiError::*;
        match self {
            MalformedJson(_) => "malformed_json",
            MalformedMultipart(_) => "malformed_multipart",
            InvalidRequest(_) => "invalid_request",
            UnsupportedMediaType(_) => "unsupported_media_type",
            PayloadTooLarge(_) => "payload_too_large",
            HostNotAllowed(_) => "host_not_allowed",
            Unauthorized(_) => "unauthorized",
            Forbidden(_) => "forbidden",
            RateLimited { .. } => "rate_limited",
            RequestTimeout(_) => "request_timeout",
            NotAcceptable(_) => "not_acceptable",
            InvalidSize(_) => "invalid_size",
            InvalidSteps(_) => "invalid_steps",
            InvalidGuidanceScale(_) => "invalid_guidance_scale",
            InvalidImageGuidanceScale(_) => "invalid_image_guidance_scale",
            InvalidStrength(_) => "invalid_strength",
            InvalidAdapterScale(_) => "invalid_adapter_scale",
            InvalidOutputFormat(_) => "invalid_output_format",
            GenerationNotFound(_) => "generation_not_found",
            EvaluationNotFound(_) => "evaluation_not_found",
            EvaluationNotFinished(_) => "evaluation_not_finished",
            UnknownReward(_) => "unknown_reward",
            GenerationCancelled(_) => "generation_cancelled",
            RequestIdInUse(_) => "request_id_in_use",
            TooManyImages(_) => "too_many_images",
            UnknownScheduler(_) => "unknown_scheduler",
            UnknownMode(_) => "unknown_mode",
            UnsupportedMode(_) => "unsupported_mode",
            InvalidImage(_) => "invalid_image",
            ImageTooLarge(_) => "image_too_large",
            InvalidAdapter(_) => "invalid_adapter",
            InvalidJob(_) => "invalid_job",
            JobNotFound(_) => "job_not_found",
            AdapterExists(_) => "adapter_exists",
            JobFinished(_) => "job_finished",
            ModelNotFound(_) => "model_not_found",
            AdapterNotFound(_) => "adapter_not_found",
            RouteNotFound(_) => "not_found",
            MethodNotAllowed(_) => "method_not_allowed",
            QueueFull { .. } => "queue_full",
            ModelLoading { .. } => "model_loading",
            ModelUnavailable(_) => "model_unavailable",
            StorageUnavailable(_) => "storage_unavailable",
            Internal(_) => "internal_error",
        }
    }

    pub fn status(&self) -> StatusCode {
        use ApiError::*;
        match self {
            MalformedJson(_) | MalformedMultipart(_) => StatusCode::BAD_REQUEST,
            UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            HostNotAllowed(_) | Forbidden(_) => StatusCode::FORBIDDEN,
            Unauthorized(_) => StatusCode::UNAUTHORIZED,
            RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            NotAcceptable(_) => StatusCode::NOT_ACCEPTABLE,
            InvalidRequest(_)
            | InvalidSize(_)
            | InvalidSteps(_)
            | InvalidGuidanceScale(_)
            | InvalidImageGuidanceScale(_)
            | InvalidStrength(_)
            | InvalidAdapterScale(_)
            | InvalidOutputFormat(_)
            | UnknownReward(_)
            | TooManyImages(_)
            | UnknownScheduler(_)
            | UnknownMode(_)
            | UnsupportedMode(_)
            | InvalidImage(_)
            | ImageTooLarge(_)
            | InvalidAdapter(_)
            | InvalidJob(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ModelNotFound(_)
            | AdapterNotFound(_)
            | RouteNotFound(_)
            | JobNotFound(_)
            | GenerationNotFound(_)
            | EvaluationNotFound(_) => {
                StatusCode::NOT_FOUND
            }
            AdapterExists(_)
            | JobFinished(_)
            | GenerationCancelled(_)
            | RequestIdInUse(_)
            | EvaluationNotFinished(_) => {
                StatusCode::CONFLICT
            }
            MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            QueueFull { .. } => StatusCode::TOO_MANY_REQUESTS,
            ModelLoading { .. } | ModelUnavailable(_) | StorageUnavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn retry_after(&self) -> Option<u64> {
        match self {
            ApiError::QueueFull { retry_after_s, .. }
            | ApiError::RateLimited { retry_after_s, .. }
            | ApiError::ModelLoading { retry_after_s, .. } => Some(*retry_after_s),
            _ => None,
        }
    }
}

/// The body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorResponse {
    pub error: ErrorBody,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// Machine-readable: malformed_json, malformed_multipart, invalid_request, unsupported_media_type,
    /// payload_too_large, not_acceptable, invalid_size, invalid_steps, invalid_guidance_scale,
    /// invalid_image_guidance_scale, invalid_strength, invalid_adapter_scale,
    /// invalid_output_format, too_many_images,
    /// unknown_scheduler, unknown_mode, unsupported_mode, invalid_image, image_too_large,
    /// invalid_adapter, adapter_exists, job_finished, model_not_found, adapter_not_found,
    /// generation_not_found, generation_cancelled, request_id_in_use, evaluation_not_found,
    /// evaluation_not_finished, unknown_reward, not_found, method_not_allowed,
    /// host_not_allowed, unauthorized, forbidden, rate_limited, request_timeout, queue_full,
    /// model_loading, model_unavailable, storage_unavailable, internal_error.
    pub code: String,
    /// For people: what was wrong and what is accepted.
    pub message: String,
}

impl ApiError {
    /// The JSON body every error response carries (also an `error` event of a stream).
    pub fn body(&self) -> ErrorResponse {
        ErrorResponse {
            error: ErrorBody {
                code: self.code().to_string(),
                message: self.to_string(),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(code = self.code(), status = status.as_u16(), message = %self, "request failed");
        } else {
            tracing::info!(code = self.code(), status = status.as_u16(), message = %self, "request refused");
        }
        let retry_after = self.retry_after();
        let body = self.body();
        let mut response = (status, Json(body)).into_response();
        if let Some(s) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if status == StatusCode::UNAUTHORIZED {
            // RFC 6750: tells clients which scheme to answer with.
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"dspo-server\""),
            );
        }
        response
    }
}

/// Whether reading a body failed because the client stopped sending it (the server's
/// `body_timeout_secs`), somewhere down an error's chain of causes.
pub fn body_timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<tower_http::timeout::TimeoutError>() {
            return true;
        }
        cur = err.source();
    }
    false
}

/// The answer to a body that stopped arriving.
pub fn body_timeout() -> ApiError {
    ApiError::RequestTimeout(
        "the request body did not arrive within server.body_timeout_secs".into(),
    )
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        let text = r.body_text();
        if body_timed_out(&r) {
            return body_timeout();
        }
        match r {
            JsonRejection::JsonSyntaxError(_) => ApiError::MalformedJson(text),
            JsonRejection::JsonDataError(_) => ApiError::InvalidRequest(text),
            JsonRejection::MissingJsonContentType(_) => {
                ApiError::UnsupportedMediaType("expected Content-Type: application/json".into())
            }
            other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                ApiError::PayloadTooLarge(text)
            }
            _ => ApiError::MalformedJson(text),
        }
    }
}

impl From<WorkerError> for ApiError {
    fn from(e: WorkerError) -> Self {
        let message = e.to_string();
        match e {
            WorkerError::QueueFull { retry_after_s, .. } => ApiError::QueueFull {
                message,
                retry_after_s,
            },
            WorkerError::Loading { retry_after_s, .. } => ApiError::ModelLoading {
                message,
                retry_after_s,
            },
            WorkerError::Unavailable { .. } | WorkerError::Stopped(_) | WorkerError::Cancelled => {
                ApiError::ModelUnavailable(message)
            }
            WorkerError::Invalid(_) => ApiError::InvalidRequest(message),
            WorkerError::Unsupported(_) => ApiError::UnsupportedMode(message),
            WorkerError::Adapter(_) => ApiError::InvalidAdapter(message),
            WorkerError::Failed(_) | WorkerError::Panicked(_) => ApiError::Internal(message),
        }
    }
}
