//! Moving a disk's chunks over one byte stream: the sending and the receiving half.
//!
//! ```text
//!  source file ──pread──▶ [blocking worker: hash, zero-test, zstd] ──frames──▶ stream
//!  stream ──frames──▶ [blocking worker: decompress, check hash, pwrite] ──▶ dest file
//! ```
//!
//! File work and compression run on blocking threads (one per side) so that the async
//! side only moves bytes; a bounded queue between them keeps memory flat whatever the
//! link speed. The frame format and the digest are `roam-migrate`'s; this file is the I/O.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use roam_migrate::digest::{to_hex, zero_hash, ChunkHashes};
use roam_migrate::frame::{DiskFrame, Kind, HEADER_LEN};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::error::{Error, Result};

/// Counters shared with progress reporting.
#[derive(Debug, Default)]
pub struct DiskCounters {
    /// Uncompressed bytes of chunks sent (zero chunks count 0).
    pub raw_bytes: AtomicU64,
    /// Bytes put on the stream (headers + bodies).
    pub stream_bytes: AtomicU64,
    pub chunks: AtomicU64,
    pub zero_chunks: AtomicU64,
}

/// The source half: owns the source-side chunk hashes of one migration.
pub struct DiskSender {
    file: Arc<File>,
    hashes: Option<ChunkHashes>,
    level: i32,
    frames_sent: u64,
    pub counters: Arc<DiskCounters>,
}

struct Item {
    header: [u8; HEADER_LEN],
    body: Vec<u8>,
}

impl DiskSender {
    pub fn new(file: Arc<File>, disk_bytes: u64, chunk_size: u32, level: i32) -> DiskSender {
        DiskSender {
            file,
            hashes: Some(ChunkHashes::new_zero(disk_bytes, chunk_size)),
            level,
            frames_sent: 0,
            counters: Arc::default(),
        }
    }

    pub fn set_level(&mut self, level: i32) {
        self.level = level;
    }

    /// For each chunk, the hash of the bytes last read (and sent or offered).
    pub fn hashes(&self) -> Option<&ChunkHashes> {
        self.hashes.as_ref()
    }

    /// Send `chunks` in order. With `skip_zero` (the first pass to an empty destination)
    /// all-zero chunks are not sent at all; otherwise they go as `Zero` frames so the
    /// destination clears what it held.
    pub async fn send<W: AsyncWrite + Unpin>(
        &mut self,
        w: &mut W,
        chunks: Vec<u64>,
        skip_zero: bool,
    ) -> Result<()> {
        let mut hashes = self
            .hashes
            .take()
            .ok_or_else(|| Error::Disk("sender used after a failed round".into()))?;
        let (tx, mut rx) = mpsc::channel::<Result<Item>>(32);
        let file = self.file.clone();
        let level = self.level;
        let counters = self.counters.clone();
        let worker = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; hashes.chunk_size() as usize];
            for idx in chunks {
                let data = match read_chunk(&file, &hashes, idx, &mut buf) {
                    Ok(d) => d,
                    Err(e) => {
                        let _ = tx.blocking_send(Err(e));
                        break;
                    }
                };
                let (frame, body, hash) = DiskFrame::for_chunk(idx, data, level);
                hashes.set(idx, hash);
                if frame.kind == Kind::Zero {
                    counters.zero_chunks.fetch_add(1, Ordering::Relaxed);
                    if skip_zero {
                        continue;
                    }
                } else {
                    counters
                        .raw_bytes
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                let item = Item {
                    header: frame.encode_header(),
                    body,
                };
                if tx.blocking_send(Ok(item)).is_err() {
                    break; // the stream side failed; it reports why
                }
            }
            hashes
        });
        let mut result = Ok(());
        while let Some(item) = rx.recv().await {
            let item = match item {
                Ok(i) => i,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            if let Err(e) = write_item(w, &item).await {
                result = Err(Error::io("send disk chunk", e));
                break;
            }
            self.frames_sent += 1;
            self.counters.chunks.fetch_add(1, Ordering::Relaxed);
            self.counters
                .stream_bytes
                .fetch_add((HEADER_LEN + item.body.len()) as u64, Ordering::Relaxed);
        }
        drop(rx);
        let hashes = worker
            .await
            .map_err(|e| Error::Disk(format!("disk reader thread: {e}")))?;
        self.hashes = Some(hashes);
        result
    }

    /// Wait until the destination has written every frame sent so far.
    pub async fn sync<W, R>(&mut self, w: &mut W, r: &mut R) -> Result<()>
    where
        W: AsyncWrite + Unpin,
        R: AsyncRead + Unpin,
    {
        let frame = DiskFrame::sync(self.frames_sent);
        w.write_all(&frame.encode_header())
            .await
            .map_err(|e| Error::io("send disk sync", e))?;
        w.flush()
            .await
            .map_err(|e| Error::io("send disk sync", e))?;
        loop {
            let f = read_reply(r).await?;
            match f.kind {
                Kind::Sync if f.index == self.frames_sent => return Ok(()),
                Kind::Sync if f.index < self.frames_sent => continue,
                _ => {
                    return Err(Error::Disk(format!(
                        "unexpected {:?} {} while waiting for sync {}",
                        f.kind, f.index, self.frames_sent
                    )))
                }
            }
        }
    }

    /// Offer the hashes of `chunks` to a destination that holds an older copy of the
    /// disk; return the chunks it lacks (the only ones that then need to travel).
    /// All-zero chunks are not offered: the destination clears what was not offered.
    pub async fn negotiate<W, R>(
        &mut self,
        w: &mut W,
        r: &mut R,
        chunks: Vec<u64>,
    ) -> Result<Vec<u64>>
    where
        W: AsyncWrite + Unpin,
        R: AsyncRead + Unpin,
    {
        let mut hashes = self
            .hashes
            .take()
            .ok_or_else(|| Error::Disk("sender used after a failed round".into()))?;
        let (tx, mut rx) = mpsc::channel::<Result<[u8; HEADER_LEN]>>(256);
        let file = self.file.clone();
        let worker = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; hashes.chunk_size() as usize];
            for idx in chunks {
                let data = match read_chunk(&file, &hashes, idx, &mut buf) {
                    Ok(d) => d,
                    Err(e) => {
                        let _ = tx.blocking_send(Err(e));
                        break;
                    }
                };
                let hash = *blake3::hash(data).as_bytes();
                hashes.set(idx, hash);
                if roam_migrate::frame::is_zero(data) {
                    continue;
                }
                let h = DiskFrame::hash_of(idx, data.len() as u32, hash).encode_header();
                if tx.blocking_send(Ok(h)).is_err() {
                    break;
                }
            }
            hashes
        });
        let mut offered = 0u64;
        let mut result: Result<()> = Ok(());
        while let Some(h) = rx.recv().await {
            match h {
                Ok(h) => {
                    if let Err(e) = w.write_all(&h).await {
                        result = Err(Error::io("send chunk hashes", e));
                        break;
                    }
                    offered += 1;
                    self.counters
                        .stream_bytes
                        .fetch_add(HEADER_LEN as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        drop(rx);
        let hashes = worker
            .await
            .map_err(|e| Error::Disk(format!("disk reader thread: {e}")))?;
        self.hashes = Some(hashes);
        result?;
        w.write_all(&DiskFrame::control(Kind::Query, offered).encode_header())
            .await
            .map_err(|e| Error::io("send chunk query", e))?;
        w.flush()
            .await
            .map_err(|e| Error::io("send chunk query", e))?;
        let mut wanted = Vec::new();
        loop {
            let f = read_reply(r).await?;
            match f.kind {
                Kind::Want => wanted.push(f.index),
                Kind::WantEnd if f.index == wanted.len() as u64 => return Ok(wanted),
                other => {
                    return Err(Error::Disk(format!(
                        "unexpected {other:?} while reading the destination's wants"
                    )))
                }
            }
        }
    }

    /// Send the seal: the count of frames and the source's digest. Returns the digest (hex).
    pub async fn seal<W: AsyncWrite + Unpin>(&mut self, w: &mut W) -> Result<String> {
        let hashes = self
            .hashes
            .as_ref()
            .ok_or_else(|| Error::Disk("sender used after a failed round".into()))?;
        let root = hashes.root();
        let frame = DiskFrame::seal(self.frames_sent, root);
        w.write_all(&frame.encode_header())
            .await
            .map_err(|e| Error::io("send disk seal", e))?;
        w.flush()
            .await
            .map_err(|e| Error::io("send disk seal", e))?;
        Ok(to_hex(&root))
    }
}

async fn read_reply<R: AsyncRead + Unpin>(r: &mut R) -> Result<DiskFrame> {
    let mut h = [0u8; HEADER_LEN];
    r.read_exact(&mut h)
        .await
        .map_err(|e| Error::io("receive from the destination's disk writer", e))?;
    DiskFrame::decode_header(&h).map_err(|e| Error::Disk(e.to_string()))
}

async fn write_item<W: AsyncWrite + Unpin>(w: &mut W, item: &Item) -> std::io::Result<()> {
    w.write_all(&item.header).await?;
    if !item.body.is_empty() {
        w.write_all(&item.body).await?;
    }
    Ok(())
}

/// Read chunk `idx` of the disk into `buf`; the slice holding it (the last chunk may be
/// short).
fn read_chunk<'a>(
    file: &File,
    hashes: &ChunkHashes,
    idx: u64,
    buf: &'a mut [u8],
) -> Result<&'a mut [u8]> {
    let (off, len) = hashes
        .range(idx)
        .ok_or_else(|| Error::Disk(format!("chunk {idx} is beyond the end of the disk")))?;
    let data = &mut buf[..len];
    read_full(file, data, off).map_err(|e| Error::io(format!("read chunk {idx}"), e))?;
    Ok(data)
}

fn read_full(file: &File, buf: &mut [u8], off: u64) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let n = file.read_at(&mut buf[done..], off + done as u64)?;
        if n == 0 {
            // Past the end of a file shorter than the disk: that part reads as zeroes.
            buf[done..].fill(0);
            return Ok(());
        }
        done += n;
    }
    Ok(())
}

/// Chunks that overlap allocated (non-hole) ranges of the file, found with
/// SEEK_DATA/SEEK_HOLE: the first pass never reads the holes of a sparse disk.
pub fn allocated_chunks(
    file: &File,
    disk_bytes: u64,
    chunk_size: u32,
) -> std::io::Result<Vec<u64>> {
    let cs = chunk_size as u64;
    let fd = file.as_raw_fd();
    let mut out: Vec<u64> = Vec::new();
    let mut pos: u64 = 0;
    while pos < disk_bytes {
        // SAFETY: lseek on an fd we own; no memory is passed.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data after pos
            }
            if e.raw_os_error() == Some(libc::EINVAL) {
                // The filesystem cannot tell: treat everything as data.
                return Ok((pos / cs..disk_bytes.div_ceil(cs)).collect());
            }
            return Err(e);
        }
        let data = data as u64;
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        let hole = if hole < 0 {
            disk_bytes
        } else {
            (hole as u64).min(disk_bytes)
        };
        let first = data / cs;
        let last = hole.div_ceil(cs);
        for c in first..last {
            if out.last().is_none_or(|&l| l < c) {
                out.push(c);
            }
        }
        pos = hole.max(data + 1);
    }
    Ok(out)
}

/// What the destination found when the source sealed the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealOutcome {
    pub ok: bool,
    pub source_root: String,
    pub dest_root: String,
    pub frames_expected: u64,
    pub frames_received: u64,
}

/// The destination half: writes chunks into `file` and keeps their hashes.
pub struct DiskReceiver {
    file: Arc<File>,
    hashes: ChunkHashes,
    /// Allocated chunks of an older copy the file was seeded with (a return move).
    base: Vec<u64>,
    pub counters: Arc<DiskCounters>,
}

impl DiskReceiver {
    pub fn new(file: Arc<File>, disk_bytes: u64, chunk_size: u32) -> DiskReceiver {
        DiskReceiver {
            file,
            hashes: ChunkHashes::new_zero(disk_bytes, chunk_size),
            base: Vec::new(),
            counters: Arc::default(),
        }
    }

    /// The file already holds an older copy of this disk whose allocated chunks are
    /// `base`: the source will offer hashes first and send only what differs.
    pub fn with_base(mut self, base: Vec<u64>) -> DiskReceiver {
        self.base = base;
        self
    }

    /// Receive frames until the seal; then make the disk durable and compare digests.
    /// `Sync` frames are answered on `ack` once every earlier frame is written.
    /// Any I/O error (a full disk first of all) ends the receive with an error that says so.
    pub async fn run<R, W>(self, r: &mut R, mut ack: W) -> Result<SealOutcome>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (tx, mut rx) = mpsc::channel::<(DiskFrame, Vec<u8>)>(32);
        let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<[u8; HEADER_LEN]>();
        let acker = tokio::spawn(async move {
            while let Some(h) = ack_rx.recv().await {
                if ack.write_all(&h).await.is_err() {
                    return;
                }
                if ack_rx.is_empty() && ack.flush().await.is_err() {
                    return;
                }
            }
        });
        let DiskReceiver {
            file,
            mut hashes,
            base,
            counters,
        } = self;
        let wcounters = counters.clone();
        let writer = tokio::task::spawn_blocking(move || -> Result<Option<SealOutcome>> {
            let mut received = 0u64;
            let mut offered = vec![false; hashes.len() as usize];
            let mut wants: Vec<u64> = Vec::new();
            let mut buf = vec![0u8; hashes.chunk_size() as usize];
            while let Some((frame, body)) = rx.blocking_recv() {
                if frame.kind == Kind::Sync {
                    let _ = ack_tx.send(DiskFrame::sync(received).encode_header());
                    continue;
                }
                if frame.kind == Kind::Hash {
                    // Do we hold this content at this place already?
                    let data = read_chunk(&file, &hashes, frame.index, &mut buf)?;
                    let held = *blake3::hash(data).as_bytes() == frame.hash;
                    if let Some(o) = offered.get_mut(frame.index as usize) {
                        *o = true;
                    }
                    if held {
                        hashes.set(frame.index, frame.hash);
                    } else {
                        wants.push(frame.index);
                    }
                    continue;
                }
                if frame.kind == Kind::Query {
                    // What the source did not offer is zero there: clear it here.
                    for &c in &base {
                        if !offered.get(c as usize).copied().unwrap_or(true) {
                            if let Some((off, len)) = hashes.range(c) {
                                clear(&file, off, len).map_err(|e| disk_write_error(c, e))?;
                                hashes.set(c, zero_hash(len));
                            }
                        }
                    }
                    for &w in &wants {
                        let _ = ack_tx.send(DiskFrame::control(Kind::Want, w).encode_header());
                    }
                    let end = DiskFrame::control(Kind::WantEnd, wants.len() as u64);
                    let _ = ack_tx.send(end.encode_header());
                    wants.clear();
                    continue;
                }
                if frame.kind == Kind::Seal {
                    file.sync_data()
                        .map_err(|e| Error::io("flush received disk", e))?;
                    let dest = hashes.root();
                    return Ok(Some(SealOutcome {
                        ok: dest == frame.hash && received == frame.index,
                        source_root: to_hex(&frame.hash),
                        dest_root: to_hex(&dest),
                        frames_expected: frame.index,
                        frames_received: received,
                    }));
                }
                let (off, len) = hashes.range(frame.index).ok_or_else(|| {
                    Error::Disk(format!(
                        "chunk {} is beyond the end of the disk",
                        frame.index
                    ))
                })?;
                if frame.raw_len as usize != len {
                    return Err(Error::Disk(format!(
                        "chunk {} has length {} but the disk's chunk there is {len}",
                        frame.index, frame.raw_len
                    )));
                }
                if frame.kind == Kind::Zero {
                    clear(&file, off, len).map_err(|e| disk_write_error(frame.index, e))?;
                    hashes.set(frame.index, zero_hash(len));
                } else {
                    let data = frame
                        .decode_body(&body)
                        .map_err(|e| Error::Disk(e.to_string()))?;
                    file.write_all_at(&data, off)
                        .map_err(|e| disk_write_error(frame.index, e))?;
                    hashes.set(frame.index, frame.hash);
                    wcounters.raw_bytes.fetch_add(len as u64, Ordering::Relaxed);
                }
                received += 1;
                wcounters.chunks.fetch_add(1, Ordering::Relaxed);
            }
            Ok(None)
        });
        let read_result: Result<()> = async {
            loop {
                let mut h = [0u8; HEADER_LEN];
                r.read_exact(&mut h)
                    .await
                    .map_err(|e| Error::io("receive disk frame", e))?;
                let frame = DiskFrame::decode_header(&h).map_err(|e| Error::Disk(e.to_string()))?;
                let mut body = vec![0u8; frame.body_len as usize];
                r.read_exact(&mut body)
                    .await
                    .map_err(|e| Error::io("receive disk frame body", e))?;
                counters
                    .stream_bytes
                    .fetch_add((HEADER_LEN + body.len()) as u64, Ordering::Relaxed);
                let seal = frame.kind == Kind::Seal;
                if tx.send((frame, body)).await.is_err() {
                    return Ok(()); // the writer stopped; its error is the one to report
                }
                if seal {
                    return Ok(());
                }
            }
        }
        .await;
        drop(tx);
        let written = writer
            .await
            .map_err(|e| Error::Disk(format!("disk writer thread: {e}")));
        acker.abort();
        let written = written?;
        match (written, read_result) {
            // A writer error (e.g. disk full) explains a read error that followed it.
            (Err(e), _) => Err(e),
            (Ok(Some(o)), _) => Ok(o),
            (Ok(None), Err(e)) => Err(e),
            (Ok(None), Ok(())) => Err(Error::Disk("disk stream ended before the seal".into())),
        }
    }
}

fn disk_write_error(index: u64, e: std::io::Error) -> Error {
    if e.raw_os_error() == Some(libc::ENOSPC) {
        Error::Disk(format!(
            "destination disk full while writing chunk {index}: {e}"
        ))
    } else {
        Error::io(format!("write chunk {index}"), e)
    }
}

/// Make a range read as zeroes: punch a hole, or write zeroes where holes are unsupported.
fn clear(file: &File, off: u64, len: usize) -> std::io::Result<()> {
    // SAFETY: fallocate on an fd we own, with plain integer arguments.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    file.write_all_at(&vec![0u8; len], off)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn disk_with(chunks: &[(u64, u8)], n: u64, cs: usize) -> (tempfile::NamedTempFile, Arc<File>) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.as_file_mut().set_len(n * cs as u64).unwrap();
        for (i, v) in chunks {
            f.as_file()
                .write_all_at(&vec![*v; cs], i * cs as u64)
                .unwrap();
        }
        f.flush().unwrap();
        let file = Arc::new(f.reopen().unwrap());
        (f, file)
    }

    #[tokio::test]
    async fn copy_then_dirty_round_makes_equal_disks() {
        let cs = 4096usize;
        let n = 64u64;
        let (_s, sfile) = disk_with(&[(1, 7), (5, 9), (63, 1)], n, cs);
        let dtmp = tempfile::NamedTempFile::new().unwrap();
        dtmp.as_file().set_len(n * cs as u64).unwrap();
        let dfile = Arc::new(dtmp.reopen().unwrap());
        let mut sender = DiskSender::new(sfile.clone(), n * cs as u64, cs as u32, 3);
        let receiver = DiskReceiver::new(dfile.clone(), n * cs as u64, cs as u32);
        // Between the bulk pass and the dirty round: chunk 5 rewritten, chunk 1 zeroed.
        let all: Vec<u64> = (0..n).collect();
        let (a, b) = tokio::io::duplex(1 << 16);
        let (mut ar, mut a) = tokio::io::split(a);
        let (mut br, bw) = tokio::io::split(b);
        let recv = tokio::spawn(async move { receiver.run(&mut br, bw).await });
        sender.send(&mut a, all, true).await.unwrap();
        sender.sync(&mut a, &mut ar).await.unwrap();
        sfile.write_all_at(&vec![3u8; cs], 5 * cs as u64).unwrap();
        sfile.write_all_at(&vec![0u8; cs], cs as u64).unwrap();
        sender.send(&mut a, vec![1, 5], false).await.unwrap();
        sender.seal(&mut a).await.unwrap();
        let out = recv.await.unwrap().unwrap();
        assert!(out.ok, "{out:?}");
        // Only the 3 non-zero chunks + 2 dirty chunks crossed.
        assert_eq!(out.frames_received, 5);
        let mut a = vec![0u8; n as usize * cs];
        let mut b = vec![0u8; n as usize * cs];
        sfile.read_exact_at(&mut a, 0).unwrap();
        dfile.read_exact_at(&mut b, 0).unwrap();
        assert!(a == b, "disks differ");
    }

    #[tokio::test]
    async fn a_missed_dirty_chunk_fails_the_seal() {
        let cs = 4096usize;
        let n = 16u64;
        let (_s, sfile) = disk_with(&[(2, 7)], n, cs);
        let dtmp = tempfile::NamedTempFile::new().unwrap();
        let dfile = Arc::new(dtmp.reopen().unwrap());
        dfile.set_len(n * cs as u64).unwrap();
        let mut sender = DiskSender::new(sfile.clone(), n * cs as u64, cs as u32, 3);
        let receiver = DiskReceiver::new(dfile, n * cs as u64, cs as u32);
        sfile.write_all_at(&vec![4u8; cs], 3 * cs as u64).unwrap();
        let (mut a, b) = tokio::io::duplex(1 << 16);
        let (mut br, bw) = tokio::io::split(b);
        let recv = tokio::spawn(async move { receiver.run(&mut br, bw).await });
        sender.send(&mut a, (0..n).collect(), true).await.unwrap();
        // Tamper: the sender's digest now includes a chunk the receiver never saw.
        if let Some(h) = sender.hashes.as_mut() {
            h.set(9, [1u8; 32]);
        }
        sender.seal(&mut a).await.unwrap();
        let out = recv.await.unwrap().unwrap();
        assert!(!out.ok);
    }

    #[tokio::test]
    async fn return_move_sends_only_what_the_old_copy_lacks() {
        let cs = 4096usize;
        let n = 64u64;
        // The destination's old copy: chunks 1..=10 as the source had them, plus chunk 50
        // that the source has since zeroed (discarded).
        let old: Vec<(u64, u8)> = (1..=10).map(|i| (i, i as u8)).chain([(50, 9)]).collect();
        let (_d, dfile) = disk_with(&old, n, cs);
        // The source now: chunks 3 and 7 rewritten, chunk 20 new, chunk 50 gone.
        let mut now: Vec<(u64, u8)> = (1..=10).map(|i| (i, i as u8)).collect();
        now[2].1 = 33;
        now[6].1 = 77;
        now.push((20, 20));
        let (_s, sfile) = disk_with(&now, n, cs);
        let base = allocated_chunks(&dfile, n * cs as u64, cs as u32).unwrap();
        assert_eq!(base.len(), 11);
        let mut sender = DiskSender::new(sfile.clone(), n * cs as u64, cs as u32, 3);
        let receiver = DiskReceiver::new(dfile.clone(), n * cs as u64, cs as u32).with_base(base);
        let (a, b) = tokio::io::duplex(1 << 16);
        let (mut ar, mut a) = tokio::io::split(a);
        let (mut br, bw) = tokio::io::split(b);
        let recv = tokio::spawn(async move { receiver.run(&mut br, bw).await });
        let all = allocated_chunks(&sfile, n * cs as u64, cs as u32).unwrap();
        let wanted = sender.negotiate(&mut a, &mut ar, all).await.unwrap();
        assert_eq!(wanted, vec![3, 7, 20]);
        sender.send(&mut a, wanted, false).await.unwrap();
        sender.sync(&mut a, &mut ar).await.unwrap();
        sender.seal(&mut a).await.unwrap();
        let out = recv.await.unwrap().unwrap();
        assert!(out.ok, "{out:?}");
        assert_eq!(out.frames_received, 3);
        let mut x = vec![0u8; n as usize * cs];
        let mut y = vec![0u8; n as usize * cs];
        sfile.read_exact_at(&mut x, 0).unwrap();
        dfile.read_exact_at(&mut y, 0).unwrap();
        assert!(x == y, "disks differ");
    }

    /// A destination whose filesystem fills up mid-copy says so, by name.
    #[tokio::test]
    async fn full_destination_disk_is_reported_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=256k", "roam-test"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs (tests run as root)");
        struct Unmount(std::path::PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount").arg(&self.0).status();
            }
        }
        let _m = Unmount(dir.path().to_path_buf());
        let cs = 65536usize;
        let n = 16u64;
        let data: Vec<(u64, u8)> = (0..n).map(|i| (i, i as u8 + 1)).collect();
        let (_s, sfile) = disk_with(&data, n, cs);
        let dfile = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(dir.path().join("disk.raw"))
            .unwrap();
        dfile.set_len(n * cs as u64).unwrap();
        let dfile = Arc::new(dfile);
        // Level 0 would still compress constant chunks; the receiver writes them whole.
        let mut sender = DiskSender::new(sfile.clone(), n * cs as u64, cs as u32, 1);
        let receiver = DiskReceiver::new(dfile, n * cs as u64, cs as u32);
        let (mut a, b) = tokio::io::duplex(1 << 20);
        let (mut br, bw) = tokio::io::split(b);
        let recv = tokio::spawn(async move { receiver.run(&mut br, bw).await });
        let _ = sender.send(&mut a, (0..n).collect(), true).await;
        let _ = sender.seal(&mut a).await;
        drop(a);
        let e = recv.await.unwrap().unwrap_err();
        assert!(e.to_string().contains("disk full"), "{e}");
    }

    #[test]
    fn allocated_chunks_skip_holes() {
        let cs = 65536usize;
        let (_t, f) = disk_with(&[(3, 1), (4, 2), (40, 3)], 64, cs);
        let got = allocated_chunks(&f, 64 * cs as u64, cs as u32).unwrap();
        assert_eq!(got, vec![3, 4, 40]);
    }

    #[tokio::test]
    async fn garbage_stream_is_an_error() {
        let dtmp = tempfile::NamedTempFile::new().unwrap();
        let dfile = Arc::new(dtmp.reopen().unwrap());
        let receiver = DiskReceiver::new(dfile, 1 << 20, 65536);
        let mut junk: &[u8] = &[0xAB; 200];
        let e = receiver
            .run(&mut junk, tokio::io::sink())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("magic"), "{e}");
    }
}
