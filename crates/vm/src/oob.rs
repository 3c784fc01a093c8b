//! A second QMP monitor, used only for out-of-band commands.
//!
//! During a paused RAM post-copy the destination's main loop can itself be blocked on a
//! guest page that never arrived, and every ordinary QMP command waits behind it. QEMU
//! lets `migrate-recover` run out of band (`exec-oob`, in the monitor's own thread) for
//! exactly that case. The `qapi` crate's client has no OOB support, and OOB needs the
//! capability negotiated at `qmp_capabilities` time, so this is a small hand-written
//! client on its own monitor socket (`RunPaths::qmp_oob`): greeting, capabilities with
//! `oob` enabled, one `exec-oob`, its answer (events in between are skipped).

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::error::{Error, Result};

/// Longest wait for the monitor's answers.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `command` with `arguments` out of band on the monitor at `socket`.
pub async fn exec_oob(socket: &Path, command: &'static str, arguments: Value) -> Result<Value> {
    tokio::time::timeout(TIMEOUT, run(socket, command, arguments))
        .await
        .map_err(|_| Error::CommandTimeout {
            command,
            timeout: TIMEOUT,
        })?
}

async fn run(socket: &Path, command: &'static str, arguments: Value) -> Result<Value> {
    let stream = UnixStream::connect(socket).await.map_err(Error::QmpIo)?;
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    let greeting = next(&mut lines).await?;
    let oob_offered = greeting["QMP"]["capabilities"]
        .as_array()
        .is_some_and(|c| c.iter().any(|v| v == "oob"));
    if !oob_offered {
        return Err(Error::Qmp {
            command,
            class: "NoOob".into(),
            desc: "this monitor does not offer out-of-band execution".into(),
        });
    }
    send(
        &mut w,
        &json!({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}),
    )
    .await?;
    answer(&mut lines, None, "qmp_capabilities").await?;
    send(
        &mut w,
        &json!({"exec-oob": command, "arguments": arguments, "id": "roam-oob"}),
    )
    .await?;
    answer(&mut lines, Some("roam-oob"), command).await
}

type Lines = tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>;

async fn next(lines: &mut Lines) -> Result<Value> {
    let line = lines
        .next_line()
        .await
        .map_err(Error::QmpIo)?
        .ok_or_else(|| {
            Error::QmpIo(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the OOB monitor closed",
            ))
        })?;
    serde_json::from_str(&line).map_err(|e| {
        Error::QmpIo(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("OOB monitor sent {line:?}: {e}"),
        ))
    })
}

async fn send(w: &mut tokio::net::unix::OwnedWriteHalf, v: &Value) -> Result<()> {
    let mut line = v.to_string();
    line.push('\n');
    w.write_all(line.as_bytes()).await.map_err(Error::QmpIo)
}

/// The answer to the command `id` names (`None`: the first answer), skipping events.
async fn answer(lines: &mut Lines, id: Option<&str>, command: &'static str) -> Result<Value> {
    loop {
        let v = next(lines).await?;
        if v.get("event").is_some() {
            continue;
        }
        if let Some(id) = id {
            if v.get("id").and_then(Value::as_str) != Some(id) {
                continue;
            }
        }
        return parse_answer(v, command);
    }
}

fn parse_answer(v: Value, command: &'static str) -> Result<Value> {
    if let Some(r) = v.get("return") {
        return Ok(r.clone());
    }
    let e = &v["error"];
    Err(Error::Qmp {
        command,
        class: e["class"].as_str().unwrap_or("?").to_string(),
        desc: e["desc"].as_str().unwrap_or("no description").to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_returns_or_errors() {
        let ok = parse_answer(json!({"return": {}, "id": "roam-oob"}), "x").unwrap();
        assert_eq!(ok, json!({}));
        let err = parse_answer(
            json!({"error": {"class": "GenericError", "desc": "Migrate recover can only be run when postcopy is paused."}}),
            "migrate-recover",
        )
        .unwrap_err();
        assert!(err.to_string().contains("postcopy is paused"), "{err}");
    }
}
