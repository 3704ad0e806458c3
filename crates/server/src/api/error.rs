//! Typed API errors: `{"error": {"code", "message", "trace_id"}}` with the request's trace id.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use fleetbox_proto::SpecError;
use fleetbox_proto::api::{ErrorBody, ErrorDetail};
use fleetbox_proto::trace::TraceParent;

use crate::store::StoreError;

tokio::task_local! {
    /// The current request's trace: its trace id and the request's own span id (set by the
    /// trace middleware).
    pub static TRACE: TraceParent;
}

/// The current request's trace id (empty outside a request).
pub fn current_trace_id() -> String {
    TRACE.try_with(|t| t.trace_id.clone()).unwrap_or_default()
}

/// The current request's trace context, to hand on (a job submitted by this request belongs
/// to its trace).
pub fn current_trace() -> Option<TraceParent> {
    TRACE.try_with(Clone::clone).ok()
}

/// [`current_trace`] as a `traceparent` header, for a job this request makes.
pub fn request_trace() -> Option<String> {
    current_trace().map(|t| t.header())
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
    /// Seconds to wait before trying again (`429`): sent as `Retry-After`.
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            field: None,
            retry_after: None,
        }
    }

    pub fn not_found(what: &str, id: &str) -> Self {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no {what} `{id}`"),
        )
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    /// The same error about a part of `parent` (`reports[3]` + `blobs.output`).
    pub fn within(mut self, parent: &str) -> Self {
        self.field = Some(match self.field.take() {
            Some(f) => format!("{parent}.{f}"),
            None => parent.to_string(),
        });
        self
    }
}

impl From<SpecError> for ApiError {
    fn from(e: SpecError) -> Self {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_spec",
            e.to_string(),
        )
        .with_field(e.field)
    }
}

impl From<crate::quota::QuotaError> for ApiError {
    fn from(e: crate::quota::QuotaError) -> Self {
        use crate::quota::QuotaError;
        match e {
            QuotaError::RateLimited { wait_s, .. } => {
                let mut err =
                    ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", e.to_string());
                err.retry_after = Some(wait_s.ceil() as u64);
                err
            }
            QuotaError::Exceeded(why) => {
                ApiError::new(StatusCode::FORBIDDEN, "quota_exceeded", why)
            }
            QuotaError::Store(e) => e.into(),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let trace = current_trace_id();
        tracing::error!(trace_id = %trace, error = %e, "store error");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the coordinator could not complete the request; its log has the details under this trace id",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message,
                trace_id: current_trace_id(),
                field: self.field,
            },
        };
        let mut resp = (self.status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(secs.max(1)),
            );
        }
        resp
    }
}
