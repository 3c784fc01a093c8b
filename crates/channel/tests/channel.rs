//! Loopback tests of the channel with real keys, real TLS and real UDP.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use roam_channel::{ChannelConfig, ChannelError, CloseCode, Identity, StreamKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const NO_CONNECTION_WAIT: Duration = Duration::from_millis(700);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_and_bulk_transfer_64_mib() {
    const LEN: usize = 64 << 20;
    let (office, home) = office_and_home(ChannelConfig::default());
    let data = pattern(LEN, 42);
    let want = sha256(&data);

    let server = tokio::spawn({
        let ep = home.ep.clone();
        async move {
            let conn = ep.accept().await.unwrap();
            let (kind, mut tx, mut rx) = conn.accept_stream().await.unwrap();
            assert_eq!(kind, StreamKind::MigrationStream);
            assert_eq!(rx.kind(), StreamKind::MigrationStream);
            let mut got = Vec::with_capacity(LEN);
            rx.read_to_end(&mut got).await.unwrap();
            // Tell the sender we have it all.
            tx.send_msg(&sha256(&got)).await.unwrap();
            tx.finish_and_wait().await.unwrap();
            (conn, got.len(), sha256(&got))
        }
    });

    let started = Instant::now();
    let conn = office
        .ep
        .connect(home.addr(), home.id.public_key())
        .await
        .unwrap();
    assert_eq!(conn.peer_key(), home.id.public_key());
    assert_eq!(conn.peer_name(), Some("home"));
    assert_eq!(conn.protocol_version(), 1);

    let (mut tx, mut rx) = conn.open_stream(StreamKind::MigrationStream).await.unwrap();
    // The daemon copies a QEMU socket into the stream the same way.
    let copied = tokio::io::copy(&mut &data[..], &mut tx).await.unwrap();
    assert_eq!(copied as usize, LEN);
    tx.finish().unwrap();
    let echoed: Vec<u8> = roam_channel::recv_msg(&mut rx).await.unwrap();
    assert!(matches!(
        rx.recv_msg::<Vec<u8>>().await,
        Err(ChannelError::Finished)
    ));
    let elapsed = started.elapsed();

    let (server_conn, got_len, got_sum) = server.await.unwrap();
    assert_eq!(got_len, LEN);
    assert_eq!(got_sum, want);
    assert_eq!(echoed, want);
    assert_eq!(server_conn.peer_key(), office.id.public_key());
    assert_eq!(server_conn.peer_name(), Some("office"));

    // Wire bytes: at least the payload, at most 5 % more (headers, ACKs, handshake).
    let st = conn.stats();
    let payload = LEN as u64;
    eprintln!(
        "64 MiB in {elapsed:?}: tx {} B ({:.2} %), rx {} B, rtt {:?}, lost {}, mtu {}",
        st.tx_bytes,
        (st.tx_bytes as f64 / payload as f64 - 1.0) * 100.0,
        st.rx_bytes,
        st.rtt,
        st.lost_packets,
        st.mtu
    );
    assert!(st.tx_bytes >= payload, "{st:?}");
    assert!(st.bandwidth_estimate_bytes_per_s().unwrap() > 0.0);
    assert!((st.tx_bytes as f64) < payload as f64 * 1.05, "{st:?}");
    assert!(server_conn.stats().rx_bytes >= payload);
    let ep = office.ep.stats();
    assert!(ep.tx_bytes >= st.tx_bytes, "{ep:?} vs {st:?}");
    assert!((ep.tx_bytes as f64) < payload as f64 * 1.05, "{ep:?}");
    assert_eq!(ep.connections_opened, 1);
    assert_eq!(ep.connections_active, 1);
    let live = office.ep.connections();
    assert_eq!(live.len(), 1);
    assert_eq!(live[0].peer_key, home.id.public_key());
    assert_eq!(live[0].remote, home.addr());
    assert_eq!(home.ep.stats().connections_accepted, 1);
}

#[tokio::test]
async fn stream_kinds_are_dispatched_and_unknown_kinds_refused() {
    let (office, home) = office_and_home(fast_config());
    let server = tokio::spawn({
        let ep = home.ep.clone();
        async move {
            let conn = ep.accept().await.unwrap();
            let mut seen = Vec::new();
            for _ in 0..3 {
                let (kind, mut tx, mut rx) = conn.accept_stream().await.unwrap();
                match kind {
                    StreamKind::Control => {
                        let m: serde_json::Value = rx.recv_msg().await.unwrap();
                        tx.send_msg(&serde_json::json!({"ack": m["n"]}))
                            .await
                            .unwrap();
                        assert!(rx.next_msg::<serde_json::Value>().await.unwrap().is_none());
                    }
                    _ => {
                        let mut buf = Vec::new();
                        rx.read_to_end(&mut buf).await.unwrap();
                        tx.write_all(&buf).await.unwrap();
                    }
                }
                tx.finish_and_wait().await.unwrap();
                seen.push(kind);
            }
            (conn, seen)
        }
    });

    let conn = office
        .ep
        .connect(home.addr(), home.id.public_key())
        .await
        .unwrap();

    // An unknown kind is refused: the opener's read fails with the rejection code.
    let (_bad_tx, mut bad_rx) = conn.open_stream_with_raw_kind(99).await.unwrap();
    let mut sink = Vec::new();
    let err = ChannelError::from(bad_rx.read_to_end(&mut sink).await.unwrap_err());
    assert!(
        matches!(err, ChannelError::StreamAborted { code: 1 }),
        "{err:?}"
    );

    let (mut ctl_tx, mut ctl_rx) = conn.open_stream(StreamKind::Control).await.unwrap();
    roam_channel::send_msg(&mut ctl_tx, &serde_json::json!({"n": 7}))
        .await
        .unwrap();
    let reply: serde_json::Value = ctl_rx.recv_msg().await.unwrap();
    assert_eq!(reply["ack"], 7);
    ctl_tx.finish().unwrap();

    for (kind, byte) in [(StreamKind::MigrationStream, 1u8), (StreamKind::Disk, 2u8)] {
        let (mut tx, mut rx) = conn.open_stream(kind).await.unwrap();
        tx.write_all(&[byte; 1000]).await.unwrap();
        tx.finish().unwrap();
        let mut back = Vec::new();
        rx.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, vec![byte; 1000]);
    }
    let (server_conn, mut seen) = server.await.unwrap();
    seen.sort_by_key(|k| *k as u8);
    assert_eq!(
        seen,
        vec![
            StreamKind::Control,
            StreamKind::MigrationStream,
            StreamKind::Disk
        ]
    );
    assert_eq!(server_conn.rejected_streams(), 1);
}

#[tokio::test]
async fn unknown_client_key_is_refused_during_handshake() {
    let home = Host::new(fast_config());
    let stranger = Host::new(fast_config());
    // The stranger pins home correctly, but home does not trust the stranger.
    let err = stranger
        .ep
        .connect(home.addr(), home.id.public_key())
        .await
        .unwrap_err();
    match err {
        ChannelError::UnknownPeer { key } => assert_eq!(key, stranger.id.public_key()),
        other => panic!("expected UnknownPeer, got {other:?}"),
    }
    // The server application never sees the connection.
    assert!(tokio::time::timeout(NO_CONNECTION_WAIT, home.ep.accept())
        .await
        .is_err());
    let st = home.ep.stats();
    assert_eq!(st.refused_handshakes, 1);
    assert_eq!(st.connections_accepted, 0);
    assert_eq!(st.connections_active, 0);
    let refusals = home.ep.recent_refusals();
    assert_eq!(refusals.len(), 1);
    assert_eq!(refusals[0].key, stranger.id.public_key());

    // Trust is consulted at run time: once added, the same client gets in.
    home.trusts("stranger", &stranger);
    let conn = stranger
        .ep
        .connect(home.addr(), home.id.public_key())
        .await
        .unwrap();
    let server_side = home.ep.accept().await.unwrap();
    assert_eq!(server_side.peer_key(), stranger.id.public_key());
    assert_eq!(server_side.peer_name(), Some("stranger"));

    // And revoking it can cut the live connection too.
    home.trust.remove(&stranger.id.public_key());
    assert_eq!(
        home.ep
            .disconnect_peer(&stranger.id.public_key(), CloseCode::UNTRUSTED, "revoked"),
        1
    );
    match conn.closed().await {
        ChannelError::ClosedByPeer { code, reason } => {
            assert_eq!(code, u64::from(CloseCode::UNTRUSTED.0));
            assert_eq!(reason, "revoked");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn wrong_server_key_is_refused() {
    let (office, home) = office_and_home(fast_config());
    let impostor_key = Identity::generate().unwrap().public_key();
    let err = office
        .ep
        .connect(home.addr(), impostor_key)
        .await
        .unwrap_err();
    match err {
        ChannelError::WrongPeerKey { expected, got } => {
            assert_eq!(expected, impostor_key);
            assert_eq!(got, home.id.public_key());
        }
        other => panic!("expected WrongPeerKey, got {other:?}"),
    }
    assert!(tokio::time::timeout(NO_CONNECTION_WAIT, home.ep.accept())
        .await
        .is_err());
    assert_eq!(home.ep.stats().connections_accepted, 0);
    assert_eq!(office.ep.stats().connections_opened, 0);
}

#[tokio::test]
async fn garbage_datagrams_do_not_hurt_the_endpoint() {
    let (office, home) = office_and_home(fast_config());
    let junk = tokio::net::UdpSocket::bind(LOCAL).await.unwrap();
    let bytes = pattern(1 << 20, 7);
    let mut sent = 0u64;
    for i in 0..600usize {
        let len = 1 + (i * 37) % 1500;
        let start = (i * 1013) % (bytes.len() - 1500);
        let mut d = bytes[start..start + len].to_vec();
        // Some look like QUIC long-header Initial packets, some like short headers.
        match i % 3 {
            0 => d[0] = 0xc0 | (d[0] & 0x0f),
            1 => d[0] = 0x40 | (d[0] & 0x3f),
            _ => {}
        }
        if i % 5 == 0 && d.len() > 5 {
            d[1..5].copy_from_slice(&1u32.to_be_bytes()); // QUIC v1
        }
        junk.send_to(&d, home.addr()).await.unwrap();
        sent += 1;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Still serving.
    let conn = office
        .ep
        .connect(home.addr(), home.id.public_key())
        .await
        .unwrap();
    let server_side = home.ep.accept().await.unwrap();
    let (mut tx, _rx) = conn.open_stream(StreamKind::Control).await.unwrap();
    tx.send_msg("still alive").await.unwrap();
    let (_, _tx, mut rx) = server_side.accept_stream().await.unwrap();
    let m: String = rx.recv_msg().await.unwrap();
    assert_eq!(m, "still alive");
    let st = home.ep.stats();
    assert!(st.rx_datagrams >= sent, "{st:?}");
    assert_eq!(st.connections_accepted, 1);
}

#[tokio::test]
async fn dead_peer_is_detected_within_seconds() {
    let (office, home) = office_and_home(fast_config());
    let relay = Relay::start(home.addr()).await;
    let conn = office
        .ep
        .connect(relay.addr, home.id.public_key())
        .await
        .unwrap();
    let server_side = home.ep.accept().await.unwrap();
    let (mut s, mut s_rx) = conn.open_stream(StreamKind::MigrationStream).await.unwrap();
    s.write_all(b"ping").await.unwrap();
    let (_, _r_tx, mut r) = server_side.accept_stream().await.unwrap();
    let mut buf = [0u8; 4];
    r.read_exact(&mut buf).await.unwrap();

    // The link goes dark: no CONNECTION_CLOSE, nothing. Both sides must notice.
    relay.cut();
    let cut_at = Instant::now();
    let client_err = ChannelError::from(s_rx.read(&mut buf).await.unwrap_err());
    let client_after = cut_at.elapsed();
    let server_err = ChannelError::from(r.read(&mut buf).await.unwrap_err());
    let server_after = cut_at.elapsed();
    eprintln!("client noticed after {client_after:?}, server after {server_after:?}");
    assert!(
        matches!(client_err, ChannelError::PeerTimedOut),
        "{client_err:?}"
    );
    assert!(
        matches!(server_err, ChannelError::PeerTimedOut),
        "{server_err:?}"
    );
    // Idle timeout is 2 s in this config; allow for PTO rounding and a slow machine.
    assert!(client_after < Duration::from_secs(5), "{client_after:?}");
    assert!(server_after < Duration::from_secs(5), "{server_after:?}");
}

#[tokio::test]
async fn dropped_peer_endpoint_is_noticed_and_totals_survive_close() {
    let (office, home) = office_and_home(fast_config());
    let conn = office
        .ep
        .connect(home.addr(), home.id.public_key())
        .await
        .unwrap();
    let server_side = home.ep.accept().await.unwrap();
    let (mut s, mut s_rx) = conn.open_stream(StreamKind::Disk).await.unwrap();
    s.write_all(&[5; 100_000]).await.unwrap();
    let (_, r_tx, mut r) = server_side.accept_stream().await.unwrap();
    let mut buf = vec![0u8; 100_000];
    r.read_exact(&mut buf).await.unwrap();
    let sent_before = office.ep.stats().tx_bytes;
    assert!(sent_before >= 100_000);

    let started = Instant::now();
    drop((server_side, r, r_tx, home));
    let err = ChannelError::from(s_rx.read(&mut buf).await.unwrap_err());
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        matches!(
            err,
            ChannelError::ClosedByPeer { .. } | ChannelError::PeerTimedOut
        ),
        "{err:?}"
    );
    drop((s, s_rx, conn));
    // The endpoint still counts what the closed connection sent.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let st = office.ep.stats();
    assert_eq!(st.connections_active, 0, "{st:?}");
    assert!(st.tx_bytes >= sent_before);
}

#[tokio::test]
async fn shutdown_tells_peers_why() {
    let (office, home) = office_and_home(fast_config());
    let conn = office
        .ep
        .connect(home.addr(), home.id.public_key())
        .await
        .unwrap();
    let _server_side = home.ep.accept().await.unwrap();
    let started = Instant::now();
    home.ep
        .shutdown(CloseCode::SHUTDOWN, "host going down")
        .await;
    assert!(started.elapsed() < Duration::from_secs(3));
    match conn.closed().await {
        ChannelError::ClosedByPeer { code, reason } => {
            assert_eq!(code, u64::from(CloseCode::SHUTDOWN.0));
            assert_eq!(reason, "host going down");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        home.ep.accept().await,
        Err(ChannelError::EndpointClosed)
    ));
    let err = office
        .ep
        .connect(home.addr(), home.id.public_key())
        .await
        .unwrap_err();
    assert!(matches!(err, ChannelError::Refused { .. }), "{err:?}");
}

/// A small long-fat-lossy path: 20 ms RTT, 1 % loss of data packets. Data must arrive
/// intact, losses must be counted, and BBR must keep the rate well above what a
/// loss-based controller allows on such a path (~1.22·MSS/(RTT·√p) ≈ 7 Mbit/s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lossy_delayed_path_delivers_intact_and_counts_losses() {
    const LEN: usize = 8 << 20;
    let (office, home) = office_and_home(fast_config());
    let relay = Relay::with_link(home.addr(), Duration::from_millis(10), 100).await;
    let data = pattern(LEN, 9);
    let want = sha256(&data);
    let server = tokio::spawn({
        let ep = home.ep.clone();
        async move {
            let conn = ep.accept().await.unwrap();
            let (_, mut tx, mut rx) = conn.accept_stream().await.unwrap();
            let mut got = Vec::new();
            rx.read_to_end(&mut got).await.unwrap();
            tx.send_msg("done").await.unwrap();
            tx.finish_and_wait().await.unwrap();
            sha256(&got)
        }
    });
    let conn = office
        .ep
        .connect(relay.addr, home.id.public_key())
        .await
        .unwrap();
    let started = Instant::now();
    let (mut s, mut s_rx) = conn.open_stream(StreamKind::Disk).await.unwrap();
    s.write_all(&data).await.unwrap();
    s.finish().unwrap();
    let done: String = s_rx.recv_msg().await.unwrap();
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(done, "done");
    assert_eq!(server.await.unwrap(), want);
    let st = conn.stats();
    let mbit = LEN as f64 * 8.0 / secs / 1e6;
    eprintln!(
        "8 MiB over 20 ms RTT, 1 % loss: {mbit:.1} Mbit/s, wire overhead {:.1} %, rtt {:?}, lost {} packets, relay dropped {}",
        (st.tx_bytes as f64 / LEN as f64 - 1.0) * 100.0,
        st.rtt,
        st.lost_packets,
        relay.dropped.load(std::sync::atomic::Ordering::Relaxed)
    );
    assert!(st.lost_packets > 0, "{st:?}");
    // 1 % retransmitted plus headers: well under 10 % extra on the wire.
    assert!((st.tx_bytes as f64) < LEN as f64 * 1.10, "{st:?}");
    assert!(st.rtt >= Duration::from_millis(20), "{st:?}");
    assert!(office.ep.stats().lost_packets >= st.lost_packets);
    // The Mathis bound of a loss-based controller on this path (CUBIC measured 6 Mbit/s
    // here). Generous margin for a busy 2-core machine: the point is "not collapsed by
    // loss", not a benchmark.
    let mathis = 1.22 * 1452.0 * 8.0 / (0.020 * 0.01f64.sqrt()) / 1e6;
    assert!(
        mbit > 1.5 * mathis,
        "{mbit:.1} Mbit/s vs Mathis {mathis:.1}"
    );
}

#[tokio::test]
async fn connect_to_nothing_is_unreachable() {
    let office = Host::new(fast_config());
    // A bound but silent UDP socket: packets vanish, nothing answers.
    let silent = std::net::UdpSocket::bind(LOCAL).unwrap();
    let key = Identity::generate().unwrap().public_key();
    let started = Instant::now();
    let err = office
        .ep
        .connect(silent.local_addr().unwrap(), key)
        .await
        .unwrap_err();
    assert!(matches!(err, ChannelError::Unreachable { .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn connection_close_carries_code_and_reason() {
    let (office, home) = office_and_home(fast_config());
    // bind also takes an owned (cloned) identity.
    let third = Identity::generate().unwrap();
    let ep =
        roam_channel::Endpoint::bind(local(), third.clone(), home.trust.clone(), fast_config())
            .unwrap();
    assert_eq!(ep.local_key(), third.public_key());
    let conn = office
        .ep
        .connect(home.addr(), home.id.public_key())
        .await
        .unwrap();
    let server_side = home.ep.accept().await.unwrap();
    server_side.close(7, "migration aborted");
    match conn.closed().await {
        ChannelError::ClosedByPeer { code, reason } => {
            assert_eq!(code, 7);
            assert_eq!(reason, "migration aborted");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        conn.open_stream(StreamKind::Control).await,
        Err(ChannelError::ClosedByPeer { code: 7, .. })
    ));
}
