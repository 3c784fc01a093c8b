//! The QMP connection: `qapi`'s typed commands, made cancel-safe, plus an event pump.
//!
//! Why the wrapper: `qapi` 0.15 parses QEMU's `"oob"` greeting capability into its
//! `Unknown` variant (an untagged unit variant only matches `null`), so it runs every
//! command without an id, holding a write lock until the answer. If a caller drops an
//! `execute` future (a timeout, a `select!`), the next command registers the same id 0
//! and `qapi` panics ("duplicate command id"); unwinding then hits its poisoned
//! mutex and the process aborts (seen with QEMU 10.0.2, and guarded by the test
//! `abandoned_commands_do_not_break_the_connection`). Every command therefore runs
//! to completion in its own task, and callers only wait on that task with a timeout.
//!
//! The events half of `qapi` must be polled for answers to arrive at all; a task does
//! that and turns each QMP event into a [`VmEvent`] on a broadcast channel.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::{Sink, StreamExt};
use qapi::futures::{QapiService, QmpStreamTokio};
use qapi::{qmp, Command, Execute};
use serde::{Deserialize, Serialize};
use tokio::io::WriteHalf;
use tokio::net::UnixStream;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::migration::MigrationStatus;

type Writer = QmpStreamTokio<WriteHalf<UnixStream>>;

/// Default time a QMP command may take (QEMU answers in ms; `migrate` returns at once).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// An asynchronous QMP event, reduced to what roam acts on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum VmEvent {
    /// The guest stopped (pause, migration switchover, …).
    Stop,
    /// The guest runs again.
    Resume,
    /// QEMU is shutting down (`reason` as QEMU names it, e.g. `host-qmp-quit`).
    Shutdown { guest: bool, reason: String },
    /// The migration changed state (needs capability `events`).
    Migration { status: MigrationStatus },
    /// A pre-copy pass over dirty memory began (needs capability `events`).
    MigrationPass { pass: i64 },
    /// Any other event, by name.
    Other { name: String },
    /// The QMP connection ended (QEMU exited or the stream broke).
    QmpClosed,
}

impl VmEvent {
    fn from_qapi(e: qmp::Event) -> Self {
        match e {
            qmp::Event::STOP { .. } => VmEvent::Stop,
            qmp::Event::RESUME { .. } => VmEvent::Resume,
            qmp::Event::SHUTDOWN { data, .. } => VmEvent::Shutdown {
                guest: data.guest,
                reason: enum_name(&data.reason),
            },
            qmp::Event::MIGRATION { data, .. } => VmEvent::Migration {
                status: MigrationStatus::from_qapi(data.status),
            },
            qmp::Event::MIGRATION_PASS { data, .. } => VmEvent::MigrationPass { pass: data.pass },
            other => {
                let name = serde_json::to_value(&other)
                    .ok()
                    .and_then(|v| v.get("event").and_then(|n| n.as_str().map(str::to_owned)))
                    .unwrap_or_else(|| "unknown".into());
                VmEvent::Other { name }
            }
        }
    }
}

/// QEMU's wire name of a QAPI enum value.
pub(crate) fn enum_name<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => "unknown".into(),
    }
}

/// A negotiated QMP connection.
pub(crate) struct Qmp {
    service: Arc<QapiService<Writer>>,
    pump: JoinHandle<()>,
}

impl Qmp {
    /// Connects to a QMP socket, negotiates capabilities and starts the event pump.
    /// Returns an error (without retrying) when the socket is not there yet.
    pub(crate) async fn connect(path: &Path, events: broadcast::Sender<VmEvent>) -> Result<Self> {
        let negotiation = QmpStreamTokio::open_uds(path).await.map_err(Error::QmpIo)?;
        let stream = negotiation.negotiate().await.map_err(Error::QmpIo)?;
        let (service, mut stream_events) = stream.into_parts();
        let pump = tokio::spawn(async move {
            while let Some(ev) = stream_events.next().await {
                match ev {
                    Ok(ev) => {
                        // No receivers is fine: nobody is interested right now.
                        let _ = events.send(VmEvent::from_qapi(ev));
                    }
                    // An event this schema does not know ends qapi's framed reader; the
                    // loop then sees the end of the stream and reports QmpClosed.
                    Err(e) => tracing::warn!(error = %e, "QMP stream error"),
                }
            }
            let _ = events.send(VmEvent::QmpClosed);
        });
        Ok(Qmp {
            service: Arc::new(service),
            pump,
        })
    }

    /// Runs a command with [`COMMAND_TIMEOUT`].
    pub(crate) async fn execute<C>(&self, cmd: C) -> Result<C::Ok>
    where
        C: Command + Send + 'static,
        C::Ok: Send + 'static,
        Writer: Sink<Execute<C, u32>, Error = io::Error> + Unpin,
    {
        self.execute_timeout(cmd, COMMAND_TIMEOUT).await
    }

    /// Runs a command; the command itself always runs to completion in its own task
    /// (see the module doc), only the waiting stops at `timeout`.
    pub(crate) async fn execute_timeout<C>(&self, cmd: C, timeout: Duration) -> Result<C::Ok>
    where
        C: Command + Send + 'static,
        C::Ok: Send + 'static,
        Writer: Sink<Execute<C, u32>, Error = io::Error> + Unpin,
    {
        let fut = self.service.execute(cmd);
        let task = tokio::spawn(fut);
        match tokio::time::timeout(timeout, task).await {
            Ok(Ok(res)) => res.map_err(|e| Error::from_execute(C::NAME, e)),
            Ok(Err(join)) => Err(Error::QmpIo(io::Error::other(join.to_string()))),
            Err(_) => Err(Error::CommandTimeout {
                command: C::NAME,
                timeout,
            }),
        }
    }
}

impl Drop for Qmp {
    fn drop(&mut self) {
        self.pump.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bare QEMU (no guest) with QMP on a socket; killed and reaped on drop.
    struct BareQemu {
        child: std::process::Child,
        dir: tempfile::TempDir,
    }

    impl BareQemu {
        fn start() -> Self {
            let dir = tempfile::Builder::new()
                .prefix("roamvm-qmp-")
                .tempdir_in("/tmp")
                .unwrap();
            let sock = dir.path().join("qmp.sock");
            let child = std::process::Command::new("qemu-system-x86_64")
                .args(["-machine", "none", "-nodefaults", "-display", "none"])
                .arg("-qmp")
                .arg(format!("unix:{},server=on,wait=off", sock.display()))
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            BareQemu { child, dir }
        }

        async fn connect(&self) -> (Qmp, broadcast::Receiver<VmEvent>) {
            let sock = self.dir.path().join("qmp.sock");
            let (tx, rx) = broadcast::channel(16);
            for _ in 0..500 {
                if sock.exists() {
                    if let Ok(q) = Qmp::connect(&sock, tx.clone()).await {
                        return (q, rx);
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("bare QEMU did not open QMP");
        }
    }

    impl Drop for BareQemu {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    #[tokio::test]
    async fn abandoned_commands_do_not_break_the_connection() {
        let qemu = BareQemu::start();
        let (qmp, _rx) = qemu.connect().await;
        // Give up on commands before QEMU can answer. With a plain `qapi` execute
        // future the next command would panic on the reused id.
        let mut timed_out = 0;
        for _ in 0..20 {
            match qmp
                .execute_timeout(qmp::query_status {}, Duration::ZERO)
                .await
            {
                Err(Error::CommandTimeout { command, .. }) => {
                    assert_eq!(command, "query-status");
                    timed_out += 1;
                }
                Ok(_) => {}
                Err(e) => panic!("unexpected {e}"),
            }
        }
        assert!(
            timed_out > 0,
            "no command was abandoned; test proves nothing"
        );
        let st = qmp.execute(qmp::query_status {}).await.unwrap();
        assert_eq!(enum_name(&st.status), "running");
    }

    #[tokio::test]
    async fn qemu_errors_are_typed_and_exit_is_seen() {
        let qemu = BareQemu::start();
        let (qmp, mut rx) = qemu.connect().await;
        let err = qmp
            .execute(qmp::migrate_continue {
                state: qmp::MigrationStatus::pre_switchover,
            })
            .await
            .unwrap_err();
        match err {
            Error::Qmp { command, class, .. } => {
                assert_eq!(command, "migrate-continue");
                assert_eq!(class, "GenericError");
            }
            other => panic!("unexpected {other}"),
        }
        let _ = qmp.execute(qmp::quit {}).await;
        let mut saw_shutdown = false;
        loop {
            match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
                Ok(Ok(VmEvent::Shutdown { guest, reason })) => {
                    assert!(!guest);
                    assert_eq!(reason, "host-qmp-quit");
                    saw_shutdown = true;
                }
                Ok(Ok(VmEvent::QmpClosed)) => break,
                Ok(Ok(_)) => {}
                other => panic!("no QmpClosed: {other:?}"),
            }
        }
        assert!(saw_shutdown);
    }

    #[test]
    fn events_map_from_qemu_json() {
        let parse = |j: &str| VmEvent::from_qapi(serde_json::from_str::<qmp::Event>(j).unwrap());
        let ts = r#""timestamp":{"seconds":1,"microseconds":2}"#;
        assert_eq!(parse(&format!(r#"{{"event":"STOP",{ts}}}"#)), VmEvent::Stop);
        assert_eq!(
            parse(&format!(
                r#"{{"event":"MIGRATION","data":{{"status":"pre-switchover"}},{ts}}}"#
            )),
            VmEvent::Migration {
                status: MigrationStatus::PreSwitchover
            }
        );
        assert_eq!(
            parse(&format!(
                r#"{{"event":"SHUTDOWN","data":{{"guest":false,"reason":"host-qmp-quit"}},{ts}}}"#
            )),
            VmEvent::Shutdown {
                guest: false,
                reason: "host-qmp-quit".into()
            }
        );
        assert_eq!(
            parse(&format!(
                r#"{{"event":"MIGRATION_PASS","data":{{"pass":3}},{ts}}}"#
            )),
            VmEvent::MigrationPass { pass: 3 }
        );
        assert_eq!(
            parse(&format!(r#"{{"event":"POWERDOWN",{ts}}}"#)),
            VmEvent::Other {
                name: "POWERDOWN".into()
            }
        );
    }
}
