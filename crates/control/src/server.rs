//! The control server: HTTP/1.1 + JSON on a unix socket, one route per [`Host`] method.
//!
//! Routes (all under `/v1`):
//!
//! | method | path                    | body          | answer                         |
//! |--------|-------------------------|---------------|--------------------------------|
//! | GET    | /v1/host                |               | 200 HostInfo                   |
//! | POST   | /v1/shutdown            |               | 204                            |
//! | GET    | /v1/peers               |               | 200 list of PeerInfo           |
//! | POST   | /v1/peers               | PeerAdd       | 201 PeerInfo                   |
//! | DELETE | /v1/peers/{name}        |               | 204                            |
//! | GET    | /v1/vms                 |               | 200 list of VmInfo             |
//! | POST   | /v1/vms                 | VmCreate      | 201 VmInfo                     |
//! | GET    | /v1/vms/{name}          |               | 200 VmInfo                     |
//! | POST   | /v1/vms/{name}/start    |               | 200 VmInfo                     |
//! | POST   | /v1/vms/{name}/stop     |               | 200 VmInfo                     |
//! | DELETE | /v1/vms/{name}          |               | 204                            |
//! | POST   | /v1/vms/{name}/migrate  | MigrateRequest| 200 NDJSON stream (crate::wire)|
//! | POST   | /v1/vms/{name}/peers    | VmPeerAdd     | 200 VmInfo                     |
//! | POST   | /v1/vms/{name}/replicas/{host} |        | 201 ReplicaInfo                |
//! | DELETE | /v1/vms/{name}/replicas/{host} |        | 204                            |
//! | GET    | /v1/replicas[?vm=NAME]  |               | 200 list of ReplicaInfo        |
//! | POST   | /v1/peers/{name}/limit  | PeerLimit     | 200 PeerInfo                   |
//! | GET    | /v1/log                 |               | 200 list of log events (JSON)  |
//! | POST   | /v1/vms/{name}/force-primary | ForcePrimary | 200 VmInfo                |
//!
//! Errors: status from [`ErrorCode::http_status`], body `{"error": {"code", "message"}}`.
//!
//! The socket is private to the daemon's user (mode 0600) from the moment it exists: it is
//! bound inside a fresh 0700 directory next to its final path, chmod-ed, then renamed into
//! place (which also atomically replaces a stale socket left by a crashed daemon).

use std::convert::Infallible;
use std::future::IntoFuture;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use tokio::net::UnixListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::api::{
    validate_name, ApiError, ErrorBody, ErrorCode, MigrateRequest, PeerAdd, Progress, VmCreate,
};
use crate::host::Host;
use crate::wire::{MigrateEvent, MAX_REQUEST_BODY, NDJSON};

/// Longest silence on the migrate stream: the latest progress is re-sent after this long
/// without news, so the client sees more than 5 lines a second whatever the daemon does.
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(150);

/// How long in-flight requests may take to finish after cancellation.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Something that is not a socket sits at the socket path; roamd will not delete it.
    #[error("{0} exists and is not a socket; remove it or choose another --socket")]
    NotASocket(PathBuf),
    /// Another daemon answers on the socket.
    #[error("another roamd is already listening on {0}")]
    AlreadyRunning(PathBuf),
    /// A file-system or socket operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ServeError {
    let path = path.to_owned();
    move |source| ServeError::Io { what, path, source }
}

/// Serves the control API on `socket_path` until `cancel` fires, then removes the socket.
pub async fn serve(
    socket_path: &Path,
    host: Arc<dyn Host>,
    cancel: CancellationToken,
) -> Result<(), ServeError> {
    let (listener, _socket) = bind_private(socket_path)?;
    tracing::info!(socket = %socket_path.display(), "control API listening");
    let server = axum::serve(listener, router(host))
        .with_graceful_shutdown(cancel.clone().cancelled_owned())
        .into_future();
    // A migrate stream can outlive the cancellation by minutes; do not let it hold the exit.
    let grace = async {
        cancel.cancelled().await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        r = server => r.map_err(io_err("serving on", socket_path))?,
        () = grace => tracing::warn!("control API: requests still open at shutdown, dropped"),
    }
    Ok(())
}

/// The router, for embedding the API in another server (tests use [`serve`]).
pub fn router(host: Arc<dyn Host>) -> Router {
    Router::new()
        .route("/v1/host", get(host_info))
        .route("/v1/shutdown", post(shutdown))
        .route("/v1/log", get(host_log))
        .route("/v1/peers", get(peer_list).post(peer_add))
        .route("/v1/peers/{name}", axum::routing::delete(peer_remove))
        .route("/v1/peers/{name}/limit", post(peer_set_limit))
        .route("/v1/vms", get(vm_list).post(vm_create))
        .route("/v1/vms/{name}", get(vm_show).delete(vm_delete))
        .route("/v1/vms/{name}/start", post(vm_start))
        .route("/v1/vms/{name}/stop", post(vm_stop))
        .route("/v1/vms/{name}/migrate", post(migrate))
        .route("/v1/vms/{name}/workload", post(vm_workload))
        .route("/v1/vms/{name}/agent", get(vm_agent))
        .route("/v1/vms/{name}/force-primary", post(vm_force_primary))
        .route("/v1/vms/{name}/peers", post(vm_peer_add))
        .route(
            "/v1/vms/{name}/replicas/{host}",
            post(replica_add).delete(replica_remove),
        )
        .route("/v1/replicas", get(replica_list))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_REQUEST_BODY))
        .with_state(host)
}

/// The socket file we created; removed on drop unless someone else's socket replaced it.
struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if m.dev() == self.dev && m.ino() == self.ino {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// Removes the private staging directory however binding ends.
struct StagingDir(PathBuf);

impl Drop for StagingDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn bind_private(path: &Path) -> Result<(UnixListener, SocketFile), ServeError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(io_err("creating", &parent))?;
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => return Err(ServeError::NotASocket(path.into())),
        Ok(_) => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ServeError::AlreadyRunning(path.into()));
            }
            tracing::info!(socket = %path.display(), "replacing stale socket");
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("checking", path)(e)),
    }
    // Short name: unix socket paths are limited to 107 bytes.
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let staging = parent.join(format!(".roamd.{}.{seq}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&staging)
        .map_err(io_err("creating", &staging))?;
    let staging = StagingDir(staging);
    let tmp = staging.0.join("s");
    let listener = UnixListener::bind(&tmp).map_err(io_err("binding", &tmp))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .map_err(io_err("chmod", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err("moving socket into place at", path))?;
    let m = std::fs::symlink_metadata(path).map_err(io_err("checking", path))?;
    Ok((
        listener,
        SocketFile {
            path: path.to_owned(),
            dev: m.dev(),
            ino: m.ino(),
        },
    ))
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.code == ErrorCode::Internal {
            tracing::warn!(message = %self.message, "control API: internal error");
        }
        let status = StatusCode::from_u16(self.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(ErrorBody { error: self })).into_response()
    }
}

type HostRef = State<Arc<dyn Host>>;
type ApiResult<T> = Result<T, ApiError>;

fn body<T>(b: Result<Json<T>, JsonRejection>) -> ApiResult<T> {
    b.map(|Json(v)| v)
        .map_err(|e| ApiError::bad_request(format!("bad request body: {}", e.body_text())))
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route (this roamd speaks /v1)")
}

async fn host_info(State(h): HostRef) -> ApiResult<impl IntoResponse> {
    Ok(Json(h.host_info().await?))
}

async fn shutdown(State(h): HostRef) -> ApiResult<StatusCode> {
    h.shutdown().await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn peer_list(State(h): HostRef) -> ApiResult<impl IntoResponse> {
    Ok(Json(h.peer_list().await?))
}

async fn peer_add(
    State(h): HostRef,
    b: Result<Json<PeerAdd>, JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let req = body(b)?;
    validate_name("peer", &req.name)?;
    if req.addr.trim().is_empty() || req.key.trim().is_empty() {
        return Err(ApiError::bad_request(
            "peer address and key must not be empty",
        ));
    }
    Ok((StatusCode::CREATED, Json(h.peer_add(req).await?)))
}

async fn peer_remove(State(h): HostRef, UrlPath(name): UrlPath<String>) -> ApiResult<StatusCode> {
    validate_name("peer", &name)?;
    h.peer_remove(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn vm_list(State(h): HostRef) -> ApiResult<impl IntoResponse> {
    Ok(Json(h.vm_list().await?))
}

async fn vm_create(
    State(h): HostRef,
    b: Result<Json<VmCreate>, JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let req = body(b)?;
    validate_name("vm", &req.name)?;
    if req.memory_mib == 0 || req.disk_bytes == 0 || req.vcpus == 0 {
        return Err(ApiError::bad_request(
            "memory, disk and vcpus must be greater than zero",
        ));
    }
    if let Some(img) = &req.disk_image {
        if !img.is_absolute() {
            return Err(ApiError::bad_request(format!(
                "disk image path {} must be absolute (roamd reads it)",
                img.display()
            )));
        }
    }
    Ok((StatusCode::CREATED, Json(h.vm_create(req).await?)))
}

async fn vm_show(
    State(h): HostRef,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<impl IntoResponse> {
    validate_name("vm", &name)?;
    Ok(Json(h.vm_show(&name).await?))
}

async fn vm_workload(
    State(h): HostRef,
    UrlPath(name): UrlPath<String>,
    b: Result<Json<crate::api::Workload>, JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    validate_name("vm", &name)?;
    let w = body(b)?;
    Ok(Json(h.vm_workload(&name, w).await?))
}

async fn vm_peer_add(
    State(h): HostRef,
    UrlPath(name): UrlPath<String>,
    b: Result<Json<crate::api::VmPeerAdd>, JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    validate_name("vm", &name)?;
    let req = body(b)?;
    Ok(Json(h.vm_peer_add(&name, req).await?))
}

async fn vm_agent(
    State(h): HostRef,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<impl IntoResponse> {
    validate_name("vm", &name)?;
    Ok(Json(h.vm_agent(&name).await?))
}

async fn host_log(State(h): HostRef) -> ApiResult<impl IntoResponse> {
    Ok(Json(h.host_log().await?))
}

async fn peer_set_limit(
    State(h): HostRef,
    UrlPath(name): UrlPath<String>,
    b: Result<Json<crate::api::PeerLimit>, JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    validate_name("peer", &name)?;
    let req = body(b)?;
    Ok(Json(h.peer_set_limit(&name, req).await?))
}

async fn vm_force_primary(
    State(h): HostRef,
    UrlPath(name): UrlPath<String>,
    b: Result<Json<crate::api::ForcePrimary>, JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    validate_name("vm", &name)?;
    let req = body(b)?;
    if req.by.as_ref().is_some_and(|b| b.len() > 256) {
        return Err(ApiError::bad_request("'by' is longer than 256 bytes"));
    }
    Ok(Json(h.vm_force_primary(&name, req).await?))
}

async fn replica_add(
    State(h): HostRef,
    UrlPath((name, host)): UrlPath<(String, String)>,
) -> ApiResult<impl IntoResponse> {
    validate_name("vm", &name)?;
    validate_name("host", &host)?;
    Ok((
        StatusCode::CREATED,
        Json(h.replica_add(&name, &host).await?),
    ))
}

async fn replica_remove(
    State(h): HostRef,
    UrlPath((name, host)): UrlPath<(String, String)>,
) -> ApiResult<StatusCode> {
    validate_name("vm", &name)?;
    validate_name("host", &host)?;
    h.replica_remove(&name, &host).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `?vm=NAME` is the only parameter; names are validated, so no percent-decoding is needed.
async fn replica_list(State(h): HostRef, RawQuery(q): RawQuery) -> ApiResult<impl IntoResponse> {
    let mut vm = None;
    for pair in q
        .as_deref()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        match pair.split_once('=') {
            Some(("vm", v)) => {
                validate_name("vm", v)?;
                vm = Some(v.to_string());
            }
            _ => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter '{pair}' (only vm=NAME)"
                )))
            }
        }
    }
    Ok(Json(h.replica_list(vm.as_deref()).await?))
}

async fn vm_start(
    State(h): HostRef,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<impl IntoResponse> {
    validate_name("vm", &name)?;
    Ok(Json(h.vm_start(&name).await?))
}

async fn vm_stop(
    State(h): HostRef,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<impl IntoResponse> {
    validate_name("vm", &name)?;
    Ok(Json(h.vm_stop(&name).await?))
}

async fn vm_delete(State(h): HostRef, UrlPath(name): UrlPath<String>) -> ApiResult<StatusCode> {
    validate_name("vm", &name)?;
    h.vm_delete(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn migrate(
    State(h): HostRef,
    UrlPath(name): UrlPath<String>,
    b: Result<Json<MigrateRequest>, JsonRejection>,
) -> ApiResult<Response> {
    let mut req = body(b)?;
    validate_name("vm", &name)?;
    if req.vm.is_empty() {
        req.vm = name;
    } else if req.vm != name {
        return Err(ApiError::bad_request(format!(
            "body names vm {:?} but the path names {:?}",
            req.vm, name
        )));
    }
    validate_name("peer", &req.to)?;
    if req.bandwidth_limit_mbit == Some(0) {
        return Err(ApiError::bad_request(
            "bandwidth limit must be greater than zero",
        ));
    }
    let (tx, rx) = mpsc::channel::<Bytes>(32);
    tokio::spawn(pump_migration(h, req, tx));
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|line| (Ok::<_, Infallible>(line), rx))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, NDJSON)
        .header(header::CACHE_CONTROL, "no-store")
        .body(Body::from_stream(stream))
        .map_err(|e| ApiError::internal(format!("building stream response: {e}")))
}

/// Runs one migration on its own task and feeds its stream. The migration is owned by this
/// task, not by the HTTP connection: when the client goes away, lines are dropped but the
/// migration runs to its end and its progress channel keeps being drained.
async fn pump_migration(host: Arc<dyn Host>, req: MigrateRequest, out: mpsc::Sender<Bytes>) {
    let (ptx, mut prx) = mpsc::channel::<Progress>(64);
    let vm = req.vm.clone();
    let mut job = tokio::spawn(async move { host.migrate(req, ptx).await });
    let mut client = Some(out);
    let mut latest: Option<Progress> = None;
    let mut progress_open = true;
    let mut tick = tokio::time::interval(PROGRESS_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let last = loop {
        tokio::select! {
            p = prx.recv(), if progress_open => match p {
                Some(p) => {
                    send_progress(&mut client, &p);
                    latest = Some(p);
                    tick.reset();
                }
                None => progress_open = false,
            },
            _ = tick.tick() => {
                if let Some(p) = &latest {
                    send_progress(&mut client, p);
                }
            }
            r = &mut job => break match r {
                Ok(Ok(result)) => MigrateEvent::Result(Box::new(result)),
                Ok(Err(e)) => MigrateEvent::Error(e),
                Err(e) => MigrateEvent::Error(ApiError::internal(format!("migration task failed: {e}"))),
            },
        }
    };
    while let Ok(p) = prx.try_recv() {
        send_progress(&mut client, &p);
    }
    match (&last, client) {
        (_, Some(out)) => {
            let _ = out.send(last.to_line()).await;
        }
        (MigrateEvent::Result(r), None) => {
            tracing::info!(vm = %vm, outcome = %r.outcome, "migration ended after its client left");
        }
        (_, None) => {}
    }
}

/// Progress lines are best effort: a slow client skips some rather than slowing the daemon.
fn send_progress(client: &mut Option<mpsc::Sender<Bytes>>, p: &Progress) {
    if let Some(tx) = client {
        if let Err(mpsc::error::TrySendError::Closed(_)) =
            tx.try_send(MigrateEvent::Progress(p.clone()).to_line())
        {
            *client = None;
        }
    }
}
