//! The control client: typed calls to roamd over its unix socket.
//!
//! One HTTP/1.1 connection per call (connecting to a local socket costs microseconds, and
//! it keeps the client free of pooling state). Used by the `roam` CLI and by `roam-lab`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{header, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::time::Instant;

use crate::api::{
    validate_name, ApiError, ErrorBody, ErrorCode, HostInfo, MigrateRequest, MigrationResult,
    PeerAdd, PeerInfo, Progress, VmCreate, VmInfo,
};
use crate::wire::{LineSplitter, MigrateEvent, MAX_LINE, MAX_RESPONSE_BODY};

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached: no daemon, wrong path, or no permission.
    #[error("cannot reach roamd at {}: {source} — is it running?", path.display())]
    Connect {
        /// The socket path tried.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The daemon refused the request.
    #[error("{0}")]
    Api(#[from] ApiError),
    /// The connection broke mid-call.
    #[error("connection to roamd failed: {0}")]
    Transport(#[from] hyper::Error),
    /// The daemon answered something this client does not understand.
    #[error("unexpected answer from roamd: {0}")]
    Protocol(String),
    /// The migrate stream ended without a final line.
    #[error(
        "roamd closed the migration stream before sending a result \
         (the migration may still be running there; see `roam vm show`)"
    )]
    StreamEnded,
}

impl ClientError {
    /// The API error code, if the daemon answered with one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Api(e) => Some(e.code),
            _ => None,
        }
    }
}

/// A handle on one roamd control socket. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Client {
    path: PathBuf,
}

impl Client {
    /// A client for the daemon listening on `socket_path` (nothing is opened yet).
    pub fn new(socket_path: impl Into<PathBuf>) -> Self {
        Client {
            path: socket_path.into(),
        }
    }

    /// The socket path.
    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    /// Polls `GET /v1/host` until the daemon answers or `timeout` passes (for tools that
    /// start roamd and must wait for its socket). Returns the last error on timeout.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<HostInfo, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.host_info().await {
                Ok(info) => return Ok(info),
                Err(e @ ClientError::Api(_)) => return Err(e),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// `GET /v1/host`.
    pub async fn host_info(&self) -> Result<HostInfo, ClientError> {
        self.call(Method::GET, "/v1/host", None::<&()>).await
    }

    /// `POST /v1/shutdown`: asks the daemon to exit.
    pub async fn shutdown(&self) -> Result<(), ClientError> {
        self.call_empty(Method::POST, "/v1/shutdown").await
    }

    /// `POST /v1/peers`.
    pub async fn peer_add(&self, req: &PeerAdd) -> Result<PeerInfo, ClientError> {
        self.call(Method::POST, "/v1/peers", Some(req)).await
    }

    /// `GET /v1/peers`.
    pub async fn peer_list(&self) -> Result<Vec<PeerInfo>, ClientError> {
        self.call(Method::GET, "/v1/peers", None::<&()>).await
    }

    /// `DELETE /v1/peers/{name}`.
    pub async fn peer_remove(&self, name: &str) -> Result<(), ClientError> {
        validate_name("peer", name)?;
        self.call_empty(Method::DELETE, &format!("/v1/peers/{name}"))
            .await
    }

    /// `GET /v1/log`: the host's event log, oldest first.
    pub async fn host_log(&self) -> Result<Vec<serde_json::Value>, ClientError> {
        self.call(Method::GET, "/v1/log", None::<&()>).await
    }

    /// `POST /v1/peers/{name}/limit`: `None` removes the limit.
    pub async fn peer_set_limit(
        &self,
        name: &str,
        mbit: Option<u32>,
    ) -> Result<PeerInfo, ClientError> {
        validate_name("peer", name)?;
        let req = crate::api::PeerLimit { mbit };
        self.call(Method::POST, &format!("/v1/peers/{name}/limit"), Some(&req))
            .await
    }

    /// `POST /v1/vms/{name}/force-primary`.
    pub async fn vm_force_primary(
        &self,
        name: &str,
        req: &crate::api::ForcePrimary,
    ) -> Result<VmInfo, ClientError> {
        validate_name("vm", name)?;
        self.call(
            Method::POST,
            &format!("/v1/vms/{name}/force-primary"),
            Some(req),
        )
        .await
    }

    /// `POST /v1/vms`.
    pub async fn vm_create(&self, req: &VmCreate) -> Result<VmInfo, ClientError> {
        self.call(Method::POST, "/v1/vms", Some(req)).await
    }

    /// `GET /v1/vms`.
    pub async fn vm_list(&self) -> Result<Vec<VmInfo>, ClientError> {
        self.call(Method::GET, "/v1/vms", None::<&()>).await
    }

    /// `GET /v1/vms/{name}`.
    pub async fn vm_show(&self, name: &str) -> Result<VmInfo, ClientError> {
        validate_name("vm", name)?;
        self.call(Method::GET, &format!("/v1/vms/{name}"), None::<&()>)
            .await
    }

    /// `POST /v1/vms/{name}/workload`.
    pub async fn vm_workload(
        &self,
        name: &str,
        w: &crate::api::Workload,
    ) -> Result<crate::api::AgentStatus, ClientError> {
        validate_name("vm", name)?;
        self.call(Method::POST, &format!("/v1/vms/{name}/workload"), Some(w))
            .await
    }

    /// `POST /v1/vms/{name}/peers`: add a HIP correspondent (`HIT@ADDR:PORT` or `HIT`).
    pub async fn vm_peer_add(&self, name: &str, peer: &str) -> Result<VmInfo, ClientError> {
        validate_name("vm", name)?;
        let req = crate::api::VmPeerAdd {
            peer: peer.to_string(),
        };
        self.call(Method::POST, &format!("/v1/vms/{name}/peers"), Some(&req))
            .await
    }

    /// `GET /v1/vms/{name}/agent`.
    pub async fn vm_agent(&self, name: &str) -> Result<crate::api::AgentStatus, ClientError> {
        validate_name("vm", name)?;
        self.call(Method::GET, &format!("/v1/vms/{name}/agent"), None::<&()>)
            .await
    }

    /// `POST /v1/vms/{name}/replicas/{host}`.
    pub async fn replica_add(
        &self,
        vm: &str,
        host: &str,
    ) -> Result<crate::api::ReplicaInfo, ClientError> {
        validate_name("vm", vm)?;
        validate_name("host", host)?;
        self.call(
            Method::POST,
            &format!("/v1/vms/{vm}/replicas/{host}"),
            None::<&()>,
        )
        .await
    }

    /// `DELETE /v1/vms/{name}/replicas/{host}`.
    pub async fn replica_remove(&self, vm: &str, host: &str) -> Result<(), ClientError> {
        validate_name("vm", vm)?;
        validate_name("host", host)?;
        self.call_empty(Method::DELETE, &format!("/v1/vms/{vm}/replicas/{host}"))
            .await
    }

    /// `GET /v1/replicas[?vm=NAME]`.
    pub async fn replica_list(
        &self,
        vm: Option<&str>,
    ) -> Result<Vec<crate::api::ReplicaInfo>, ClientError> {
        let path = match vm {
            Some(v) => {
                validate_name("vm", v)?;
                format!("/v1/replicas?vm={v}")
            }
            None => "/v1/replicas".to_string(),
        };
        self.call(Method::GET, &path, None::<&()>).await
    }

    /// `POST /v1/vms/{name}/start`.
    pub async fn vm_start(&self, name: &str) -> Result<VmInfo, ClientError> {
        validate_name("vm", name)?;
        self.call(Method::POST, &format!("/v1/vms/{name}/start"), None::<&()>)
            .await
    }

    /// `POST /v1/vms/{name}/stop`.
    pub async fn vm_stop(&self, name: &str) -> Result<VmInfo, ClientError> {
        validate_name("vm", name)?;
        self.call(Method::POST, &format!("/v1/vms/{name}/stop"), None::<&()>)
            .await
    }

    /// `DELETE /v1/vms/{name}`.
    pub async fn vm_delete(&self, name: &str) -> Result<(), ClientError> {
        validate_name("vm", name)?;
        self.call_empty(Method::DELETE, &format!("/v1/vms/{name}"))
            .await
    }

    /// `POST /v1/vms/{vm}/migrate`: runs a migration, calling `on_progress` for each
    /// progress line, and returns the final report. An aborted migration is `Ok` with
    /// `outcome: aborted`; `Err` means the request was refused or the stream broke.
    pub async fn migrate(
        &self,
        req: &MigrateRequest,
        mut on_progress: impl FnMut(&Progress),
    ) -> Result<MigrationResult, ClientError> {
        validate_name("vm", &req.vm)?;
        let resp = self
            .send(
                Method::POST,
                &format!("/v1/vms/{}/migrate", req.vm),
                Some(req),
            )
            .await?;
        if !resp.status().is_success() {
            return Err(error_from(resp).await);
        }
        let mut body = resp.into_body();
        let mut lines = LineSplitter::new(MAX_LINE);
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame?.into_data() else {
                continue;
            };
            lines.push(&data);
            while let Some(line) = lines
                .next_line()
                .map_err(|e| ClientError::Protocol(e.to_string()))?
            {
                let event = MigrateEvent::from_line(&line)
                    .map_err(|e| ClientError::Protocol(format!("bad stream line: {e}")))?;
                match event {
                    MigrateEvent::Progress(p) => on_progress(&p),
                    MigrateEvent::Result(r) => return Ok(*r),
                    MigrateEvent::Error(e) => return Err(ClientError::Api(e)),
                }
            }
        }
        Err(ClientError::StreamEnded)
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        let resp = self.send(method, path, body).await?;
        if !resp.status().is_success() {
            return Err(error_from(resp).await);
        }
        let bytes = read_body(resp.into_body()).await?;
        serde_json::from_slice(&bytes)
            .map_err(|e| ClientError::Protocol(format!("bad JSON from {path}: {e}")))
    }

    async fn call_empty(&self, method: Method, path: &str) -> Result<(), ClientError> {
        let resp = self.send(method, path, None::<&()>).await?;
        if !resp.status().is_success() {
            return Err(error_from(resp).await);
        }
        read_body(resp.into_body()).await?;
        Ok(())
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<Response<Incoming>, ClientError> {
        let stream = tokio::net::UnixStream::connect(&self.path)
            .await
            .map_err(|source| ClientError::Connect {
                path: self.path.clone(),
                source,
            })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        // The connection task ends when the response body is finished or dropped.
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "control connection ended");
            }
        });
        let payload = match body {
            Some(b) => serde_json::to_vec(b)
                .map_err(|e| ClientError::Protocol(format!("cannot encode request: {e}")))?,
            None => Vec::new(),
        };
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "roamd")
            .header(header::ACCEPT, "application/json");
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(payload)))
            .map_err(|e| ClientError::Protocol(format!("cannot build request: {e}")))?;
        Ok(sender.send_request(req).await?)
    }
}

async fn read_body(body: Incoming) -> Result<Bytes, ClientError> {
    Limited::new(body, MAX_RESPONSE_BODY)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| match e.downcast::<hyper::Error>() {
            Ok(e) => ClientError::Transport(*e),
            Err(e) => ClientError::Protocol(format!("answer body: {e}")),
        })
}

async fn error_from(resp: Response<Incoming>) -> ClientError {
    let status = resp.status();
    let bytes = match read_body(resp.into_body()).await {
        Ok(b) => b,
        Err(e) => return e,
    };
    match serde_json::from_slice::<ErrorBody>(&bytes) {
        Ok(b) => ClientError::Api(b.error),
        Err(_) => ClientError::Api(ApiError::new(
            ErrorCode::from_http_status(status.as_u16()),
            format!(
                "HTTP {}: {}",
                status_text(status),
                String::from_utf8_lossy(&bytes).trim()
            ),
        )),
    }
}

fn status_text(s: StatusCode) -> String {
    match s.canonical_reason() {
        Some(r) => format!("{} {r}", s.as_u16()),
        None => s.as_u16().to_string(),
    }
}
