//! The peer API: what other roamd may ask of this host over the channel.
//!
//! The channel has already refused every host whose key is not pinned here; what
//! arrives is from a trusted peer. Each connection's first control stream opens one
//! conversation: an incoming migration (a control stream whose first message is an
//! `Offer`), the rest of a post-copy disk after a lost link (`ResumeDisk`), or a
//! replication session (a first stream of kind `Replication`).

use std::sync::Arc;
use std::time::Duration;

use roam_channel::{Connection, StreamKind};
use roam_migrate::Msg;
use tracing::{info, warn};

use crate::daemon::Daemon;
use crate::migration::{dest, recv_ctl, send_ctl};

pub async fn accept_loop(d: Arc<Daemon>) {
    loop {
        let conn = match d.endpoint.accept().await {
            Ok(c) => c,
            // Refused handshakes (unknown keys) never surface here: only a closed endpoint.
            Err(e) => {
                info!("peer channel closed: {e}");
                return;
            }
        };
        tokio::spawn(handle(d.clone(), conn));
    }
}

async fn handle(d: Arc<Daemon>, conn: Connection) {
    let peer = conn.peer_key().to_string();
    let (kind, mut tx, mut rx) = match conn.accept_stream().await {
        Ok(s) => s,
        Err(e) => {
            info!(peer = %peer, "peer left before speaking: {e}");
            return;
        }
    };
    if kind == StreamKind::Replication {
        let first = tokio::time::timeout(
            Duration::from_secs(30),
            rx.recv_msg::<crate::replication::protocol::ReplMsg>(),
        )
        .await;
        match first {
            Ok(Ok(crate::replication::protocol::ReplMsg::Claims { version, claims })) => {
                crate::ownership::serve(d, conn, tx, rx, version, claims).await
            }
            Ok(Ok(first)) => {
                if let crate::replication::protocol::ReplMsg::Hello { vm, .. } = &first {
                    // A peer replicating a VM defined here: compare claims first.
                    crate::ownership::before_contact(&d, conn.peer_name(), vm).await;
                }
                crate::replication::replica::serve(d, conn, tx, rx, first).await
            }
            Ok(Err(e)) => warn!(peer = %peer, "reading the first replication message: {e}"),
            Err(_) => warn!(peer = %peer, "no replication message within 30 s"),
        }
        return;
    }
    if kind != StreamKind::Control {
        warn!(peer = %peer, ?kind, "first stream is not a control stream; closing");
        conn.close(3, "expected a control stream");
        return;
    }
    match recv_ctl(&mut rx, Duration::from_secs(30)).await {
        Ok(Msg::Offer {
            version,
            source_host,
            vm,
            postcopy,
        }) => {
            info!(vm = %vm.name, from = %source_host, postcopy, "incoming migration");
            dest::serve(d, conn, tx, rx, source_host, version, vm, postcopy).await;
        }
        Ok(Msg::ResumeDisk {
            version,
            vm,
            generation,
            ram,
        }) if roam_migrate::protocol::version_accepted(version) => {
            info!(vm = %vm, peer = %peer, generation, ram, "asked to resume a post-copy");
            crate::migration::resume::serve(d, conn, tx, rx, vm, generation, ram).await;
        }
        Ok(other) => {
            let _ = send_ctl(
                &mut tx,
                &Msg::Refuse {
                    reason: format!("unexpected {} to open a conversation", other.name()),
                },
            )
            .await;
        }
        Err(e) => warn!(peer = %peer, "reading the first message: {e}"),
    }
}
