//! The real server on a temp unix socket, driven by the real client (and by raw HTTP where
//! the exact bytes matter), with a test double of the daemon behind it.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{progress, result, TestServer};
use roam_control::api::*;
use roam_control::{Client, ClientError, ServeError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn code(e: ClientError) -> ErrorCode {
    e.code()
        .unwrap_or_else(|| panic!("expected an API error, got {e}"))
}

/// Sends one raw HTTP/1.1 request and returns (status, content-type, body).
async fn raw(
    socket: &std::path::Path,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, String, String) {
    let mut s = tokio::net::UnixStream::connect(socket).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: roamd\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8(out).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head[9..12].parse().unwrap();
    let ctype = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type: ")
                .map(str::to_string)
        })
        .unwrap_or_default();
    (status, ctype, body.to_string())
}

#[tokio::test]
async fn every_route_round_trips() {
    let srv = TestServer::start().await;
    let c = srv.client();

    assert_eq!(
        c.wait_ready(Duration::from_secs(1)).await.unwrap().name,
        "office"
    );
    let info = c.host_info().await.unwrap();
    assert_eq!(
        (info.name.as_str(), info.accel, info.vms, info.peers),
        ("office", Accel::Tcg, 0, 0)
    );

    let add = PeerAdd {
        name: "home".into(),
        addr: "198.18.1.1:4433".into(),
        key: "ed25519:BBBB".into(),
    };
    let p = c.peer_add(&add).await.unwrap();
    assert_eq!(
        (p.name, p.addr, p.key),
        (add.name.clone(), add.addr.clone(), add.key.clone())
    );
    assert_eq!(c.peer_list().await.unwrap().len(), 1);

    let create = VmCreate {
        name: "desk".into(),
        memory_mib: 1024,
        disk_bytes: 8 << 30,
        vcpus: 2,
        disk_image: Some("/srv/images/debian.qcow2".into()),
        hip_peers: Vec::new(),
        hip_rvs: None,
    };
    let v = c.vm_create(&create).await.unwrap();
    assert_eq!(
        (v.state, v.memory_mib, v.vcpus, v.disk_bytes),
        (VmState::Created, 1024, 2, 8 << 30)
    );
    assert_eq!(c.vm_show("desk").await.unwrap(), v);
    assert_eq!(c.vm_list().await.unwrap(), vec![v.clone()]);
    assert_eq!(c.host_info().await.unwrap().vms, 1);

    let v = c.vm_start("desk").await.unwrap();
    assert_eq!(
        (v.state, v.pid, v.accel),
        (VmState::Running, Some(4242), Some(Accel::Tcg))
    );
    let v = c.vm_stop("desk").await.unwrap();
    assert_eq!((v.state, v.pid), (VmState::Stopped, None));
    c.vm_delete("desk").await.unwrap();
    assert!(c.vm_list().await.unwrap().is_empty());

    c.peer_remove("home").await.unwrap();
    assert!(c.peer_list().await.unwrap().is_empty());

    // Shutdown: the daemon cancels the token, the server answers then exits and removes
    // its socket.
    let socket = srv.socket.clone();
    c.shutdown().await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), async {
        while !srv.task.is_finished() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("server exits after shutdown");
    assert!(!socket.exists(), "socket removed on exit");
    srv.stop().await;
}

#[tokio::test]
async fn errors_map_to_codes_and_statuses() {
    let srv = TestServer::start().await;
    let c = srv.client();
    assert_eq!(
        code(c.vm_show("nope").await.unwrap_err()),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(c.peer_remove("nope").await.unwrap_err()),
        ErrorCode::NotFound
    );

    let create = VmCreate {
        name: "desk".into(),
        memory_mib: 512,
        disk_bytes: 1 << 30,
        vcpus: 1,
        disk_image: None,
        hip_peers: Vec::new(),
        hip_rvs: None,
    };
    c.vm_create(&create).await.unwrap();
    let e = c.vm_create(&create).await.unwrap_err();
    assert_eq!(code(e), ErrorCode::Conflict);
    c.vm_start("desk").await.unwrap();
    assert_eq!(
        code(c.vm_delete("desk").await.unwrap_err()),
        ErrorCode::Conflict
    );

    // Validation in the API layer, before the daemon sees it.
    let bad = VmCreate {
        name: "../etc".into(),
        ..create.clone()
    };
    let e = c.vm_create(&bad).await.unwrap_err();
    assert_eq!(code(e), ErrorCode::BadRequest);
    let zero = VmCreate {
        name: "z".into(),
        memory_mib: 0,
        ..create.clone()
    };
    assert_eq!(
        code(c.vm_create(&zero).await.unwrap_err()),
        ErrorCode::BadRequest
    );
    let rel = VmCreate {
        name: "r".into(),
        disk_image: Some("rel/img".into()),
        ..create.clone()
    };
    assert_eq!(
        code(c.vm_create(&rel).await.unwrap_err()),
        ErrorCode::BadRequest
    );
    // The client refuses path names that are not names, without a round trip.
    assert_eq!(
        code(c.vm_show("a/b").await.unwrap_err()),
        ErrorCode::BadRequest
    );

    // Raw: status numbers and the error envelope.
    let (status, ctype, body) = raw(&srv.socket, "GET", "/v1/vms/nope", "").await;
    assert_eq!(status, 404);
    assert!(ctype.starts_with("application/json"), "{ctype}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], "not_found");
    assert_eq!(v["error"]["message"], "no vm nope");

    let (status, _, body) = raw(
        &srv.socket,
        "POST",
        "/v1/vms",
        r#"{"name":"desk","memory_mib":1,"disk_bytes":1}"#,
    )
    .await;
    assert_eq!(
        (
            status,
            serde_json::from_str::<ErrorBody>(&body).unwrap().error.code
        ),
        (409, ErrorCode::Conflict)
    );

    let (status, _, body) = raw(&srv.socket, "POST", "/v1/vms", "{not json").await;
    assert_eq!(status, 400);
    assert_eq!(
        serde_json::from_str::<ErrorBody>(&body).unwrap().error.code,
        ErrorCode::BadRequest
    );

    let (status, _, body) = raw(&srv.socket, "GET", "/v2/host", "").await;
    assert_eq!(status, 404);
    assert_eq!(
        serde_json::from_str::<ErrorBody>(&body).unwrap().error.code,
        ErrorCode::NotFound
    );

    let big = format!(
        r#"{{"name":"x","addr":"a","key":"{}"}}"#,
        "k".repeat(100_000)
    );
    let (status, _, body) = raw(&srv.socket, "POST", "/v1/peers", &big).await;
    assert_eq!(status, 400, "request bodies are capped");
    assert!(body.contains("length limit exceeded"), "{body}");

    // peer_refused travels in the migrate stream.
    let req = MigrateRequest {
        vm: "desk".into(),
        to: "offline".into(),
        postcopy: false,
        bandwidth_limit_mbit: None,
    };
    let e = c.migrate(&req, |_| {}).await.unwrap_err();
    assert_eq!(code(e), ErrorCode::PeerRefused);
    srv.stop().await;
}

#[tokio::test]
async fn migrate_streams_progress_then_result() {
    let srv = TestServer::start().await;
    let c = srv.client();
    let req = MigrateRequest {
        vm: "desk".into(),
        to: "home".into(),
        postcopy: true,
        bandwidth_limit_mbit: Some(50),
    };
    let mut seen: Vec<(Instant, Progress)> = Vec::new();
    let t0 = Instant::now();
    let r = c
        .migrate(&req, |p| seen.push((Instant::now(), p.clone())))
        .await
        .unwrap();
    let took = t0.elapsed();
    assert_eq!(r, result("desk", "home", Outcome::Completed));

    // The fake reports every 400 ms; the server fills in so the client sees >= 5 per second.
    let rate = seen.len() as f64 / took.as_secs_f64();
    assert!(rate >= 5.0, "{} progress lines in {took:?}", seen.len());
    let max_gap = seen.windows(2).map(|w| w[1].0 - w[0].0).max().unwrap();
    assert!(max_gap < Duration::from_millis(300), "gap {max_gap:?}");
    // Every report the fake sent arrives, in order.
    let phases: Vec<Phase> = seen.iter().map(|(_, p)| p.phase).collect();
    let mut distinct = phases.clone();
    distinct.dedup();
    assert_eq!(distinct, [Phase::Connect, Phase::Memory, Phase::Switchover]);
    assert_eq!(seen[0].1, progress(Phase::Connect, 0));

    // Aborted migrations are results, not errors.
    let req = MigrateRequest {
        vm: "flaky".into(),
        ..req
    };
    let r = c.migrate(&req, |_| {}).await.unwrap();
    assert_eq!(r.outcome, Outcome::Aborted);
    assert_eq!(r.error.as_deref(), Some("destination QEMU exited"));

    // Refused up front: an error line, mapped to the code.
    let req = MigrateRequest {
        vm: "ghost".into(),
        ..req
    };
    assert_eq!(
        code(c.migrate(&req, |_| {}).await.unwrap_err()),
        ErrorCode::NotFound
    );
    srv.stop().await;
}

#[tokio::test]
async fn migrate_wire_format_is_ndjson() {
    let srv = TestServer::start().await;
    let (status, ctype, body) = raw(
        &srv.socket,
        "POST",
        "/v1/vms/flaky/migrate",
        r#"{"to":"home"}"#,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(ctype, "application/x-ndjson");
    // Chunked transfer encoding: pick the JSON lines out of the chunk framing.
    let lines: Vec<serde_json::Value> = body
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.len() >= 2);
    assert_eq!(lines[0]["progress"]["phase"], "memory");
    let last = lines.last().unwrap();
    assert_eq!(last["result"]["outcome"], "aborted");
    assert_eq!(last["result"]["vm"], "flaky");

    let (status, _, body) = raw(
        &srv.socket,
        "POST",
        "/v1/vms/desk/migrate",
        r#"{"vm":"other","to":"home"}"#,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    srv.stop().await;
}

#[tokio::test]
async fn client_disconnect_does_not_cancel_migration() {
    let srv = TestServer::start().await;
    let c = srv.client();
    let req = MigrateRequest {
        vm: "slow".into(),
        to: "home".into(),
        postcopy: false,
        bandwidth_limit_mbit: None,
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    let mut tx = Some(tx);
    let call = tokio::spawn(async move {
        c.migrate(&req, |_| {
            if let Some(tx) = tx.take() {
                let _ = tx.send(());
            }
        })
        .await
    });
    rx.await.unwrap();
    call.abort(); // the client goes away mid-stream
    assert!(call.await.unwrap_err().is_cancelled());
    assert!(!srv.host.migrated_slow.load(Ordering::SeqCst));
    tokio::time::timeout(Duration::from_secs(5), async {
        while !srv.host.migrated_slow.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("migration ran to its end without its client");
    // The server still answers.
    srv.client().host_info().await.unwrap();
    srv.stop().await;
}

#[tokio::test]
async fn socket_is_private_and_stale_socket_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("roamd.sock");
    // A crashed daemon leaves its socket file behind: nobody listens on it.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(std::fs::symlink_metadata(&socket)
        .unwrap()
        .file_type()
        .is_socket());

    let srv = TestServer::start_at(dir, socket.clone()).await;
    let meta = std::fs::symlink_metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    srv.client().host_info().await.unwrap();
    // No staging directory is left behind.
    let names: Vec<_> = std::fs::read_dir(srv.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["roamd.sock"]);

    // A second daemon on the same socket is refused, and leaves the first one's socket alone.
    let cancel = tokio_util::sync::CancellationToken::new();
    let host = std::sync::Arc::new(common::FakeHost::new(cancel.clone()));
    let e = roam_control::serve(&socket, host.clone(), cancel.clone())
        .await
        .unwrap_err();
    assert!(matches!(e, ServeError::AlreadyRunning(_)), "{e}");
    srv.client().host_info().await.unwrap();

    // Something that is not a socket is never deleted.
    let file = srv.dir.path().join("not-a-socket");
    std::fs::write(&file, b"precious").unwrap();
    let e = roam_control::serve(&file, host, cancel).await.unwrap_err();
    assert!(matches!(e, ServeError::NotASocket(_)), "{e}");
    assert_eq!(std::fs::read(&file).unwrap(), b"precious");

    let socket = srv.socket.clone();
    srv.stop().await;
    assert!(!socket.exists());
}

#[tokio::test]
async fn no_daemon_gives_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("roamd.sock");
    let t0 = Instant::now();
    let e = Client::new(&path)
        .wait_ready(Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(t0.elapsed() >= Duration::from_millis(200));
    assert!(matches!(e, ClientError::Connect { .. }), "{e}");
    let e = Client::new(&path).host_info().await.unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, ClientError::Connect { .. }));
    assert!(
        msg.starts_with(&format!("cannot reach roamd at {}: ", path.display())),
        "{msg}"
    );
    assert!(msg.ends_with("is it running?"), "{msg}");
}

#[tokio::test]
async fn replica_routes_round_trip() {
    let srv = TestServer::start().await;
    let c = srv.client();
    // Unknown VM: the daemon's error code comes through.
    assert_eq!(
        code(c.replica_add("desk", "home").await.unwrap_err()),
        ErrorCode::NotFound
    );
    c.vm_create(&VmCreate {
        name: "desk".into(),
        memory_mib: 512,
        disk_bytes: 1 << 30,
        vcpus: 1,
        disk_image: None,
        hip_peers: Vec::new(),
        hip_rvs: None,
    })
    .await
    .unwrap();
    let r = c.replica_add("desk", "home").await.unwrap();
    assert_eq!(
        (r.vm.as_str(), r.host.as_str(), r.state),
        ("desk", "home", ReplicaState::Seeding)
    );
    assert_eq!(
        code(c.replica_add("desk", "home").await.unwrap_err()),
        ErrorCode::Conflict
    );
    c.replica_add("desk", "laptop").await.unwrap();
    assert_eq!(c.replica_list(None).await.unwrap().len(), 2);
    assert_eq!(c.replica_list(Some("desk")).await.unwrap().len(), 2);
    assert!(c.replica_list(Some("other")).await.unwrap().is_empty());

    // The wire format: snake_case state, 201 on add, 400 for an unknown parameter or a bad
    // name.
    let (status, _, body) = raw(&srv.socket, "GET", "/v1/replicas?vm=desk", "").await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v[0]["state"], "seeding");
    assert_eq!(v[0]["lag_bytes"], 8u64 << 30);
    let (status, _, _) = raw(&srv.socket, "GET", "/v1/replicas?host=x", "").await;
    assert_eq!(status, 400);
    let (status, _, _) = raw(&srv.socket, "POST", "/v1/vms/desk/replicas/bad%20name", "").await;
    assert_eq!(status, 400);
    let (status, _, _) = raw(&srv.socket, "POST", "/v1/vms/desk/replicas/attic", "").await;
    assert_eq!(status, 201);

    c.replica_remove("desk", "home").await.unwrap();
    assert_eq!(
        code(c.replica_remove("desk", "home").await.unwrap_err()),
        ErrorCode::NotFound
    );
    let left: Vec<String> = c
        .replica_list(None)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.host)
        .collect();
    assert_eq!(left, vec!["laptop".to_string(), "attic".to_string()]);
    srv.stop().await;
}

#[tokio::test]
async fn vm_peer_add_round_trips() {
    let srv = TestServer::start().await;
    let c = srv.client();
    let peer = "2001:2a:1:2:3:4:5:6@198.18.3.2:10500";
    assert_eq!(
        code(c.vm_peer_add("desk", peer).await.unwrap_err()),
        ErrorCode::NotFound
    );
    c.vm_create(&VmCreate {
        name: "desk".into(),
        memory_mib: 512,
        disk_bytes: 1 << 30,
        vcpus: 1,
        disk_image: None,
        hip_peers: Vec::new(),
        hip_rvs: Some("2001:2a::9@198.18.3.3:10500".into()),
    })
    .await
    .unwrap();
    let v = c.vm_peer_add("desk", peer).await.unwrap();
    assert_eq!(v.net.unwrap().peers, vec![peer.to_string()]);
    let shown = c.vm_show("desk").await.unwrap();
    assert_eq!(shown.net.unwrap().peers, vec![peer.to_string()]);
    assert_eq!(
        code(c.vm_peer_add("desk", "nonsense").await.unwrap_err()),
        ErrorCode::BadRequest
    );
    // The wire format: {"peer": ...}; a body of another shape is a 400 from the server.
    let (status, _, body) = raw(
        &srv.socket,
        "POST",
        "/v1/vms/desk/peers",
        r#"{"peer":"2001:2a::7"}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, _, _) = raw(&srv.socket, "POST", "/v1/vms/desk/peers", r#"{"hit":1}"#).await;
    assert_eq!(status, 400);
    // hip_rvs is optional on the wire (older clients send none).
    let old: VmCreate =
        serde_json::from_str(r#"{"name":"old","memory_mib":512,"disk_bytes":1048576}"#).unwrap();
    assert_eq!(old.hip_rvs, None);
}
