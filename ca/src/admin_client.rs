//! The client side of the admin socket, used by `kith ca token|entry|node|…`.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(
        "cannot reach the CA's admin socket {path}: {error} (is `kith ca serve` running with this --data-dir, and are you its user or root?)"
    )]
    Connect {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("admin request failed: {0}")]
    Http(String),
    #[error("{code}: {message}")]
    Refused {
        status: u16,
        code: String,
        message: String,
    },
}

pub struct AdminClient {
    path: PathBuf,
}

impl AdminClient {
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
        }
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, AdminError> {
        let stream =
            UnixStream::connect(&self.path)
                .await
                .map_err(|error| AdminError::Connect {
                    path: self.path.clone(),
                    error,
                })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| AdminError::Http(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "kith-ca-admin")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| AdminError::Http(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| AdminError::Http(e.to_string()))?;
        let status = resp.status().as_u16();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| AdminError::Http(e.to_string()))?
            .to_bytes();
        let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned())
        });
        if status >= 400 {
            return Err(AdminError::Refused {
                status,
                code: value["code"].as_str().unwrap_or("error").to_owned(),
                message: value["message"].as_str().unwrap_or_default().to_owned(),
            });
        }
        Ok(value)
    }

    /// For endpoints that answer with text (the PEM bundle).
    pub async fn call_text(&self, path: &str) -> Result<String, AdminError> {
        match self.call(Method::GET, path, None).await? {
            serde_json::Value::String(s) => Ok(s),
            other => Ok(other.to_string()),
        }
    }
}
