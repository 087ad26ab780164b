//! TorchServe's workflow routes: `GET|POST /workflows`, `GET|DELETE /workflows/{name}` on the
//! management listener, `/wfpredict/{name}` on the inference listener (src/workflow does the work).
//!
//! As TorchServe: the list pages with `limit` (at most 100) and `next_page_token`; register takes
//! `url`, `workflow_name`, `response_timeout` and `startup_timeout` as query parameters and
//! always waits for the workers. Unlike TorchServe, a malformed number is a 400 (TorchServe falls
//! back to the default), and registering needs enable_model_api, as registering a model does.

use axum::extract::{RawQuery, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::error::ApiError;
use super::{parse_query, ApiPath, AppState};
use crate::workflow::{RegisterWorkflow, WorkflowError};

impl From<WorkflowError> for ApiError {
    fn from(e: WorkflowError) -> ApiError {
        ApiError::new(e.kind(), e.to_string())
    }
}

/// A query parameter as a non-negative number (empty: not given).
fn number(pairs: &[(String, String)], key: &str) -> Result<Option<u64>, ApiError> {
    match pairs.iter().find(|(k, v)| k == key && !v.is_empty()) {
        None => Ok(None),
        Some((_, v)) => v.parse::<u32>().map(|n| Some(u64::from(n))).map_err(|_| {
            ApiError::bad_request(format!(
                "Parameter {key} must be a non-negative integer, got {v:?}"
            ))
        }),
    }
}

pub async fn list(
    State(state): State<AppState>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let pairs = parse_query(q.as_deref())?;
    // TorchServe's bounds: a limit above 100 is 100.
    let limit = number(&pairs, "limit")?.unwrap_or(100).clamp(1, 100) as usize;
    let start = number(&pairs, "next_page_token")?.unwrap_or(0) as usize;
    let all = state.workflows.list();
    let page: Vec<_> = all
        .iter()
        .skip(start)
        .take(limit)
        .map(|(name, url)| json!({"workflowName": name, "workflowUrl": url}))
        .collect();
    let mut body = json!({ "workflows": page });
    if start + limit < all.len() {
        body["nextPageToken"] = json!((start + limit).to_string());
    }
    Ok(Json(body).into_response())
}

pub async fn register(
    State(state): State<AppState>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    if !state.config.enable_model_api {
        return Err(ApiError::method_not_allowed());
    }
    let pairs = parse_query(q.as_deref())?;
    let text = |key: &str| pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
    let Some(url) = text("url") else {
        return Err(ApiError::bad_request("Parameter url is required."));
    };
    let seconds = |key: &str| -> Result<_, ApiError> {
        Ok(number(&pairs, key)?.map(std::time::Duration::from_secs))
    };
    let name = state
        .workflows
        .register(RegisterWorkflow {
            url,
            name: text("workflow_name"),
            response_timeout: seconds("response_timeout")?,
            startup_timeout: seconds("startup_timeout")?,
        })
        .await?;
    Ok(Json(json!({
        "status": format!("Workflow {name} has been registered and scaled successfully.")
    }))
    .into_response())
}

pub async fn describe(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Response, ApiError> {
    let wf = state.workflows.get(&name)?;
    Ok(Json(json!([wf.describe()])).into_response())
}

pub async fn unregister(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Response, ApiError> {
    if !state.config.enable_model_api {
        return Err(ApiError::method_not_allowed());
    }
    state.workflows.unregister(&name).await?;
    Ok(Json(json!({ "status": format!("Workflow \"{name}\" unregistered") })).into_response())
}

/// `/wfpredict/{name}`: the request, shaped as for a prediction, through the workflow's DAG.
pub async fn predict(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    req: Request,
) -> Response {
    if !matches!(*req.method(), Method::POST | Method::PUT | Method::GET) {
        return ApiError::method_not_allowed().into_response();
    }
    // Refused before the body is read, as a prediction for an unknown model is.
    if let Err(e) = state.workflows.get(&name) {
        return ApiError::from(e).into_response();
    }
    let request = match super::inference::workflow_request(&state, req).await {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    match state.workflows.predict(&name, request).await {
        Ok(reply) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, reply.content_type)],
            reply.body,
        )
            .into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}
