//! One client connection: the handshake, then hand-over to [`transmit`].
//!
//! The handshake runs on the connection's thread with per-read timeouts;
//! every option is bounded by [`crate::proto::MAX_OPTION_LEN`] before its
//! payload is read.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use tracing::debug;

use super::export::Export;
use super::transmit;
use super::Shared;
use crate::proto::handshake::{self, ClientFlags, ClientOption, OptionHeader};
use crate::proto::{self, opt, rep};

const READ_BUF: usize = 256 * 1024;
const WRITE_BUF: usize = 256 * 1024;
/// A client that has not picked an export after this many options is
/// wasting a thread.
const MAX_OPTIONS: usize = 1024;

/// Why a connection ended early (logged at debug level only: a client
/// hanging up is not the server's problem).
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("handshake: {0}")]
    Handshake(#[from] handshake::HandshakeError),
    #[error("{0}")]
    Protocol(&'static str),
    #[error("transmission: {0}")]
    Transmit(#[from] transmit::TransmitError),
}

pub(crate) fn serve(shared: &Shared, id: u64, stream: UnixStream) {
    if let Err(e) = serve_inner(shared, id, stream) {
        debug!(conn = id, "nbd connection closed: {e}");
    }
}

fn serve_inner(shared: &Shared, id: u64, stream: UnixStream) -> Result<(), ConnError> {
    stream.set_read_timeout(Some(shared.config.handshake_timeout))?;
    stream.set_write_timeout(Some(shared.config.handshake_timeout))?;
    let mut reader = BufReader::with_capacity(READ_BUF, stream.try_clone()?);
    let mut writer = BufWriter::with_capacity(WRITE_BUF, stream.try_clone()?);

    let Some(export) = handshake(shared, &mut reader, &mut writer)? else {
        return Ok(());
    };
    if !export.attach(id, stream.try_clone()?) {
        return Err(ConnError::Protocol("export removed during handshake"));
    }
    // Detach however transmission ends, even by a panic in a backend, so
    // export removal never waits for a connection that is gone.
    let _detach = Detach(&export, id);
    stream.set_read_timeout(None)?;
    stream.set_write_timeout(None)?;
    let name = format!("nbd-conn-{id}");
    let workers = shared.config.workers_per_connection;
    transmit::run(&export, &stream, reader, writer, workers, &name)?;
    Ok(())
}

struct Detach<'a>(&'a Export, u64);

impl Drop for Detach<'_> {
    fn drop(&mut self) {
        self.0.detach(self.1);
    }
}

/// Runs the option haggling; returns the chosen export, or None if the
/// client aborted.
fn handshake(
    shared: &Shared,
    reader: &mut BufReader<UnixStream>,
    writer: &mut BufWriter<UnixStream>,
) -> Result<Option<Arc<Export>>, ConnError> {
    writer.write_all(&handshake::encode_greeting())?;
    writer.flush()?;
    let mut b4 = [0u8; 4];
    reader.read_exact(&mut b4)?;
    let flags = ClientFlags::decode(&b4)?;

    let mut data = Vec::new();
    let mut out = Vec::with_capacity(512);
    for _ in 0..MAX_OPTIONS {
        let mut hb = [0u8; OptionHeader::LEN];
        reader.read_exact(&mut hb)?;
        let h = OptionHeader::decode(&hb)?;
        data.clear();
        data.resize(h.length as usize, 0);
        reader.read_exact(&mut data)?;

        out.clear();
        let chosen = match ClientOption::decode(h.option, &data) {
            Err(_) if h.option == opt::EXPORT_NAME => {
                // EXPORT_NAME has no error reply: closing is the only answer.
                return Err(ConnError::Protocol("bad EXPORT_NAME"));
            }
            Err(e) => {
                handshake::encode_error(&mut out, h.option, e.reply_type(), &e.to_string());
                None
            }
            Ok(ClientOption::ExportName(name)) => {
                let export = shared
                    .lookup(name)
                    .ok_or(ConnError::Protocol("EXPORT_NAME for unknown export"))?;
                let tf = proto::transmission_flags(export.read_only);
                handshake::encode_export_name_reply(&mut out, export.size, tf, flags.no_zeroes);
                Some(export)
            }
            Ok(ClientOption::Abort) => {
                handshake::encode_ack(&mut out, opt::ABORT);
                writer.write_all(&out)?;
                writer.flush()?;
                return Ok(None);
            }
            Ok(ClientOption::List) => {
                for name in shared.export_names() {
                    handshake::encode_rep_server(&mut out, &name);
                }
                handshake::encode_ack(&mut out, opt::LIST);
                None
            }
            Ok(ClientOption::Info { name, requests }) | Ok(ClientOption::Go { name, requests }) => {
                match shared.lookup(name) {
                    None => {
                        handshake::encode_error(
                            &mut out,
                            h.option,
                            rep::ERR_UNKNOWN,
                            "no such export",
                        );
                        None
                    }
                    Some(export) => {
                        let tf = proto::transmission_flags(export.read_only);
                        handshake::encode_info_export(&mut out, h.option, export.size, tf);
                        if requests.contains(proto::info::NAME) {
                            handshake::encode_info_name(&mut out, h.option, &export.name);
                        }
                        // Always sent: the constraints hold whether or not
                        // the client asked, and qemu-nbd does the same.
                        handshake::encode_info_block_size(&mut out, h.option);
                        handshake::encode_ack(&mut out, h.option);
                        (h.option == opt::GO).then_some(export)
                    }
                }
            }
            Ok(ClientOption::Unsupported(o)) => {
                handshake::encode_error(&mut out, o, rep::ERR_UNSUP, "");
                None
            }
        };
        writer.write_all(&out)?;
        writer.flush()?;
        if chosen.is_some() {
            return Ok(chosen);
        }
    }
    Err(ConnError::Protocol("too many options"))
}
