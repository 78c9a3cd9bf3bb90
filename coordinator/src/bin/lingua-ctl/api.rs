//! The coordinator's HTTP API as `lingua-ctl` calls it, and what can go
//! wrong, each with its exit code.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use lingua_shared::process::Exit;
use reqwest::{Method, StatusCode};
use serde_json::Value;

/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an admin call may take (job submissions and the event stream
/// set their own).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// Bad usage: an unreadable file, invalid JSON, a bad URL.
    #[error("{0}")]
    Usage(String),
    /// The coordinator cannot be reached, or Redis behind it is down.
    #[error("{0}")]
    Unavailable(String),
    /// The token is missing, wrong, or not an admin's.
    #[error("{0}")]
    Unauthorized(String),
    /// The coordinator refused the request (unknown node, a conflict), or
    /// the job failed.
    #[error("{0}")]
    Refused(String),
    /// The coordinator answered something this CLI does not understand.
    #[error("{0}")]
    Internal(String),
}

impl CtlError {
    /// The exit code (README, docs/OPERATIONS.md).
    pub fn exit_code(&self) -> ExitCode {
        match self {
            CtlError::Usage(_) => Exit::Usage.into(),
            CtlError::Unavailable(_) => Exit::Unavailable.into(),
            CtlError::Unauthorized(_) => ExitCode::from(77),
            CtlError::Refused(_) => ExitCode::FAILURE,
            CtlError::Internal(_) => Exit::Internal.into(),
        }
    }
}

/// A coordinator, and the token to call it with.
pub struct Api {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Api {
    /// A client of the coordinator at `url`, trusting `ca_file` besides
    /// the usual roots when given.
    pub fn new(url: &str, token: Option<String>, ca_file: Option<&Path>) -> Result<Self, CtlError> {
        let base = url.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(CtlError::Usage(format!(
                "--url {url:?} must start with http:// or https://"
            )));
        }
        let mut http = reqwest::Client::builder().connect_timeout(CONNECT_TIMEOUT);
        if let Some(path) = ca_file {
            let pem = std::fs::read(path).map_err(|err| {
                CtlError::Usage(format!("cannot read --ca-file {}: {err}", path.display()))
            })?;
            let cert = reqwest::Certificate::from_pem(&pem).map_err(|err| {
                CtlError::Usage(format!(
                    "--ca-file {} is not a PEM certificate: {err}",
                    path.display()
                ))
            })?;
            http = http.add_root_certificate(cert);
        }
        let http = http
            .build()
            .map_err(|err| CtlError::Internal(format!("cannot set up the HTTP client: {err}")))?;
        Ok(Self { base, token, http })
    }

    /// The coordinator's address, for messages.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// A request to `path` with the token, without a time limit.
    pub fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let request = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// `GET path`: the JSON answer.
    pub async fn get(&self, path: &str) -> Result<Value, CtlError> {
        self.send(self.request(Method::GET, path).timeout(CALL_TIMEOUT))
            .await
    }

    /// Sends `request`: its JSON answer when 2xx, else the API's error.
    pub async fn send(&self, request: reqwest::RequestBuilder) -> Result<Value, CtlError> {
        match self.exchange(request).await? {
            (status, body) if status.is_success() => Ok(body),
            (status, body) => Err(api_error(status, &body)),
        }
    }

    /// Sends `request`: its status and JSON answer, whatever the status.
    pub async fn exchange(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<(StatusCode, Value), CtlError> {
        let response = request.send().await.map_err(|err| self.unreachable(&err))?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|err| self.unreachable(&err))?;
        match serde_json::from_str(&text) {
            Ok(body) => Ok((status, body)),
            Err(_) if !status.is_success() => Ok((status, Value::Null)),
            Err(err) => Err(CtlError::Internal(format!(
                "{}: unexpected answer ({err}); is this a Lingua coordinator?",
                self.base
            ))),
        }
    }

    /// Sends `request`: the response when 2xx, else the API's error.
    pub async fn open(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, CtlError> {
        let response = request.send().await.map_err(|err| self.unreachable(&err))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        Err(api_error(status, &body))
    }

    fn unreachable(&self, err: &reqwest::Error) -> CtlError {
        if err.is_timeout() {
            return CtlError::Unavailable(format!(
                "the coordinator at {} did not answer in time; check its logs and `lingua-ctl nodes`",
                self.base
            ));
        }
        let mut reason = err.to_string();
        let mut source = std::error::Error::source(err);
        while let Some(inner) = source {
            reason = format!("{reason}: {inner}");
            source = inner.source();
        }
        CtlError::Unavailable(format!(
            "cannot reach the coordinator at {} ({reason}); check --url or LINGUA_URL, and that lingua-coordinator runs",
            self.base
        ))
    }
}

/// The error a non-2xx answer stands for, with the API's message.
pub fn api_error(status: StatusCode, body: &Value) -> CtlError {
    let code = body["error"]["code"].as_str().unwrap_or("");
    let message = body["error"]["message"]
        .as_str()
        .map_or_else(|| status.to_string(), str::to_owned);
    match (status, code) {
        (StatusCode::UNAUTHORIZED, _) => CtlError::Unauthorized(format!(
            "{message}; give an admin token with --token-file or LINGUA_TOKEN"
        )),
        (StatusCode::FORBIDDEN, _) => CtlError::Unauthorized(format!(
            "{message}; lingua-ctl needs an admin token (api_tokens)"
        )),
        (_, "unavailable") => CtlError::Unavailable(format!(
            "{message}: the coordinator cannot reach Redis; check its logs"
        )),
        _ => CtlError::Refused(if code.is_empty() {
            message
        } else {
            format!("{code}: {message}")
        }),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn api_errors_map_to_exit_codes() {
        let body = |code: &str| json!({"error": {"code": code, "message": "m"}});
        let cases = [
            (StatusCode::UNAUTHORIZED, body("unauthorized"), 77),
            (StatusCode::FORBIDDEN, body("forbidden"), 77),
            (StatusCode::SERVICE_UNAVAILABLE, body("unavailable"), 69),
            (StatusCode::NOT_FOUND, body("not_found"), 1),
            (StatusCode::SERVICE_UNAVAILABLE, body("no_capacity"), 1),
            (StatusCode::BAD_GATEWAY, Value::Null, 1),
        ];
        for (status, body, exit) in cases {
            assert_eq!(
                api_error(status, &body).exit_code(),
                ExitCode::from(exit),
                "{status} {body}"
            );
        }
    }

    #[test]
    fn urls_need_a_scheme() {
        let err = Api::new("coordinator:7700", None, None).err().unwrap();
        assert!(err.to_string().contains("http://"), "{err}");
    }
}
