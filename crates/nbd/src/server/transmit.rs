//! The transmission phase of one connection: a small team of worker
//! threads in a leader/follower arrangement.
//!
//! ```text
//!            reader lock                       writer lock
//!  worker: [read header (+payload)] → execute → [append reply, maybe flush]
//!  worker:            [read next] → execute ─────→ [append reply]
//!  worker:                    [read next] → execute (e.g. slow fdatasync) …
//! ```
//!
//! Whichever worker holds the reader lock is the leader: it reads the next
//! request from the buffered socket, lets go of the lock, runs the request
//! against the backend and appends the reply. There is no queue and no
//! hand-off of requests between threads, and each worker owns its data
//! buffer, so nothing is allocated per request. Several requests run at
//! once, which matters because the kernel's buffered-write path can cost
//! tens of microseconds per 4 KiB `pwrite`; replies may therefore leave out
//! of order, which NBD allows (the client matches them by cookie).
//!
//! Replies are batched without ever holding one back behind a slow request
//! (a post-copy read may wait on the network). Pending replies are flushed
//! unless some other worker is certain to look at them promptly: one that is
//! already waiting for the writer lock, or an idle one waiting for the
//! reader lock while a complete request is buffered (it will take that
//! request at once and apply the same rule). Both points where replies can
//! be left pending, after appending one and after taking a request, apply
//! the rule, so a reply is never left behind with nobody coming.

use std::io::{self, BufReader, BufWriter, IoSlice, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use tracing::debug;

use super::export::{Counters, Export};
use crate::proto::{self, check_request, errno, Action, Request, SimpleReply};

/// Why a connection's transmission phase ended abnormally.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TransmitError {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("bad request magic")]
    BadMagic,
    #[error("write larger than the maximum block size")]
    Oversized,
}

struct Conn<'a> {
    export: &'a Export,
    stream: &'a UnixStream,
    reader: Mutex<BufReader<UnixStream>>,
    writer: Mutex<BufWriter<UnixStream>>,
    /// Workers that asked for the writer lock and have not got it yet.
    waiting_writers: AtomicUsize,
    /// Idle workers that asked for the reader lock and have not got it yet.
    waiting_readers: AtomicUsize,
    /// The read buffer held a complete request header when last checked.
    more_buffered: AtomicBool,
    done: AtomicBool,
    error: Mutex<Option<TransmitError>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A worker that panicked marks the connection done (see `Bail`), so the
    // data behind a poisoned lock is never used for a new request.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs the request loop with `workers` threads (at least one: the caller's).
pub(crate) fn run(
    export: &Export,
    stream: &UnixStream,
    reader: BufReader<UnixStream>,
    writer: BufWriter<UnixStream>,
    workers: usize,
    name: &str,
) -> Result<(), TransmitError> {
    let conn = Conn {
        export,
        stream,
        reader: Mutex::new(reader),
        writer: Mutex::new(writer),
        waiting_writers: AtomicUsize::new(0),
        waiting_readers: AtomicUsize::new(0),
        more_buffered: AtomicBool::new(false),
        done: AtomicBool::new(false),
        error: Mutex::new(None),
    };
    std::thread::scope(|s| {
        for i in 1..workers.max(1) {
            let c = &conn;
            // Fewer workers than asked for is still a working connection.
            let _ = std::thread::Builder::new()
                .name(format!("{name}-w{i}"))
                .spawn_scoped(s, move || worker(c));
        }
        worker(&conn);
    });
    let _ = lock(&conn.writer).flush();
    let err = lock(&conn.error).take();
    match err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Ends the connection if a worker panics, so the others do not keep a
/// half-served client waiting forever.
struct Bail<'a, 'b>(&'b Conn<'a>);

impl Drop for Bail<'_, '_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0
                .finish(Some(TransmitError::Io(io::Error::other("worker panicked"))));
        }
    }
}

impl Conn<'_> {
    /// Stops every worker. A clean end (EOF, DISC) only half-closes, so
    /// requests already running still get their replies; an error closes
    /// both ways to wake a leader blocked in read.
    fn finish(&self, err: Option<TransmitError>) {
        let first = !self.done.swap(true, Ordering::SeqCst);
        match err {
            Some(e) => {
                let _ = self.stream.shutdown(Shutdown::Both);
                let mut slot = lock(&self.error);
                if slot.is_none() {
                    *slot = Some(e);
                }
            }
            None if first => {
                let _ = self.stream.shutdown(Shutdown::Read);
            }
            None => {}
        }
    }

    /// Appends a reply (header + optional data) and applies the flush rule.
    fn send(&self, error: u32, cookie: u64, data: &[u8]) -> io::Result<()> {
        if error != 0 {
            Counters::add(&self.export.counters.errors, 1);
        }
        let h = SimpleReply { error, cookie }.encode();
        self.waiting_writers.fetch_add(1, Ordering::SeqCst);
        let mut w = lock(&self.writer);
        self.waiting_writers.fetch_sub(1, Ordering::SeqCst);
        write_two(&mut w, &h, data)?;
        if !self.someone_will_flush() {
            w.flush()?;
        }
        Ok(())
    }

    /// True if another worker will soon append a reply or take a buffered
    /// request, and so re-apply the flush rule.
    fn someone_will_flush(&self) -> bool {
        self.waiting_writers.load(Ordering::SeqCst) > 0
            || (self.more_buffered.load(Ordering::SeqCst)
                && self.waiting_readers.load(Ordering::SeqCst) > 0)
    }
}

fn worker(c: &Conn<'_>) {
    let _bail = Bail(c);
    // Grown on demand up to MAX_REQUEST_LEN and reused for every request.
    let mut buf: Vec<u8> = Vec::new();
    while !c.done.load(Ordering::SeqCst) {
        match step(c, &mut buf) {
            Ok(true) => {}
            Ok(false) => c.finish(None),
            Err(e) => c.finish(Some(e)),
        }
    }
}

/// What the leader took off the wire.
enum Taken {
    Run(Request, Action),
    Refuse(Request, u32, bool),
    Stop,
}

/// Serves one request. Ok(false) means the client is done.
fn step(c: &Conn<'_>, buf: &mut Vec<u8>) -> Result<bool, TransmitError> {
    let taken = take_request(c, buf)?;
    let (req, action) = match taken {
        Taken::Stop => return Ok(false),
        Taken::Refuse(req, code, close) => {
            c.send(code, req.cookie, &[])?;
            if close {
                // The error reply must leave before the socket is shut.
                lock(&c.writer).flush()?;
                return Err(TransmitError::Oversized);
            }
            return Ok(true);
        }
        Taken::Run(req, action) => (req, action),
    };

    let e = c.export;
    let cnt = &e.counters;
    let backend = &*e.backend;
    let result = match action {
        Action::Read { offset, len } => {
            let len = len as usize;
            grow(buf, len);
            match backend.read_at(&mut buf[..len], offset) {
                Ok(()) => {
                    c.send(0, req.cookie, &buf[..len])?;
                    Counters::add(&cnt.reads, 1);
                    Counters::add(&cnt.bytes_read, len as u64);
                    return Ok(true);
                }
                Err(err) => Err(err),
            }
        }
        Action::Write { offset, len, fua } => {
            let len = len as usize;
            let r = backend.write_at(&buf[..len], offset, fua);
            count(r, &cnt.writes, Some((&cnt.bytes_written, len as u64)))
        }
        Action::Flush => count(backend.flush(), &cnt.flushes, None),
        Action::Trim { offset, len, fua } => {
            count(backend.trim(offset, u64::from(len), fua), &cnt.trims, None)
        }
        Action::WriteZeroes {
            offset,
            len,
            may_trim,
            fua,
        } => count(
            backend.write_zeroes(offset, u64::from(len), may_trim, fua),
            &cnt.write_zeroes,
            None,
        ),
        Action::Disconnect => return Ok(false),
    };
    let code = match result {
        Ok(()) => 0,
        Err(err) => {
            debug!(export = %e.name, "backend error: {err}");
            errno::from_io(&err)
        }
    };
    c.send(code, req.cookie, &[])?;
    Ok(true)
}

/// Under the reader lock: reads one request and, for a WRITE, its payload
/// into `buf`.
fn take_request(c: &Conn<'_>, buf: &mut Vec<u8>) -> Result<Taken, TransmitError> {
    c.waiting_readers.fetch_add(1, Ordering::SeqCst);
    let mut r = lock(&c.reader);
    c.waiting_readers.fetch_sub(1, Ordering::SeqCst);
    if c.done.load(Ordering::SeqCst) {
        return Ok(Taken::Stop);
    }
    let taken = read_one(c, &mut r, buf);
    // Decide "this was the last request" before the next worker can read:
    // after a bad header or an unskippable payload the stream is out of
    // sync, and nothing after DISC may be served.
    let last = match &taken {
        Err(_) | Ok(Taken::Stop) | Ok(Taken::Refuse(_, _, true)) => true,
        Ok(Taken::Run(_, Action::Disconnect)) => true,
        Ok(_) => false,
    };
    if last {
        c.done.store(true, Ordering::SeqCst);
    }
    c.more_buffered
        .store(r.buffer().len() >= Request::LEN, Ordering::SeqCst);
    // Decided while still holding the reader lock, so a counted waiting
    // reader really comes after us.
    let flush = !c.someone_will_flush();
    drop(r);
    if flush {
        // This request may take long (or the next may never come): replies
        // left pending for "whoever comes next" go out now.
        let mut w = lock(&c.writer);
        if !w.buffer().is_empty() {
            w.flush()?;
        }
    }
    taken
}

fn read_one(
    c: &Conn<'_>,
    r: &mut BufReader<UnixStream>,
    buf: &mut Vec<u8>,
) -> Result<Taken, TransmitError> {
    let mut hdr = [0u8; Request::LEN];
    match r.read_exact(&mut hdr) {
        Ok(()) => {}
        // EOF between requests is how most clients say goodbye.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Taken::Stop),
        Err(e) => return Err(e.into()),
    }
    let req = Request::decode(&hdr).map_err(|_| TransmitError::BadMagic)?;

    let taken = if c.export.is_closing() {
        let skip = req.payload_len();
        if skip > proto::MAX_REQUEST_LEN {
            return Ok(Taken::Stop);
        }
        discard(r, skip)?;
        Taken::Refuse(req, errno::ESHUTDOWN, false)
    } else {
        match check_request(&req, c.export.size, c.export.read_only) {
            Ok(action) => {
                if let Action::Write { len, .. } = action {
                    let len = len as usize;
                    grow(buf, len);
                    r.read_exact(&mut buf[..len])?;
                }
                Taken::Run(req, action)
            }
            Err(rej) => {
                discard(r, rej.skip)?;
                Taken::Refuse(req, rej.errno, rej.close)
            }
        }
    };
    Ok(taken)
}

fn count(r: io::Result<()>, ops: &AtomicU64, bytes: Option<(&AtomicU64, u64)>) -> io::Result<()> {
    if r.is_ok() {
        Counters::add(ops, 1);
        if let Some((b, n)) = bytes {
            Counters::add(b, n);
        }
    }
    r
}

fn grow(buf: &mut Vec<u8>, len: usize) {
    if buf.len() < len {
        buf.resize(len, 0);
    }
}

fn discard(r: &mut BufReader<UnixStream>, n: u32) -> io::Result<()> {
    let n = u64::from(n);
    let copied = io::copy(&mut r.by_ref().take(n), &mut io::sink())?;
    if copied < n {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Writes a reply header and its data. Small replies go through the buffer;
/// big ones bypass it with one vectored write, saving a copy of the data.
fn write_two(w: &mut BufWriter<UnixStream>, a: &[u8], b: &[u8]) -> io::Result<()> {
    if w.buffer().len() + a.len() + b.len() <= w.capacity() {
        w.write_all(a)?;
        return w.write_all(b);
    }
    w.flush()?;
    let mut bufs = [IoSlice::new(a), IoSlice::new(b)];
    let mut slices: &mut [IoSlice<'_>] = &mut bufs;
    let s = w.get_mut();
    while !slices.is_empty() {
        match s.write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
