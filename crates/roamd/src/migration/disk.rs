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
//!
//! # Dedup: only what the destination holds nowhere crosses
//! When the destination holds an older copy or its dedup index knows chunks of other
//! disks, the source first offers the hash of every allocated chunk (`Hash`, 56 bytes per
//! 64 KiB). For each, the receiver, in this order:
//! 1. holds it already at that offset (an older copy of this disk): nothing to do;
//! 2. finds it anywhere on this host through the index, reads it and checks its hash
//!    (an index row may be stale), and copies it locally;
//! 3. is already getting the same content for another chunk of this transfer: the chunk
//!    is written from that one when it arrives ("pending");
//! 4. wants it.
//!
//! A pending chunk waits for a frame whose content has its hash. If the source's chunk
//! changed between its offer and its send, the source notices (the hash it reads differs
//! from the one it offered) and sends every chunk that shared the old hash itself; a
//! chunk written directly is never overwritten by a later pending copy. Whatever goes
//! wrong, the seal's digest catches a chunk left unresolved.
//!
//! To a replica whose committed batch the source knows (`negotiate_changed`), only the
//! chunks written since are offered and the `Query` says "unoffered = held": the receiver
//! keeps those base chunks and hashes them from its file, so the seal still proves them.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use std::collections::{BTreeSet, HashMap, HashSet};

use roam_migrate::digest::{chunk_count, to_hex, zero_hash, ChunkHashes, Digest};
use roam_migrate::frame::{DiskFrame, Kind, HEADER_LEN, QUERY_UNOFFERED_HELD};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::dedup::SharedIndex;
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
    /// Offered chunks the destination held at the same offset (an older copy), and
    /// chunks not offered because the destination's replica holds them unchanged.
    pub held_chunks: AtomicU64,
    /// `Hash` offers sent (56 bytes each).
    pub offered_chunks: AtomicU64,
    /// Offered chunks the destination found elsewhere (its index: another disk, another
    /// offset) or copies from another chunk of this transfer.
    pub deduped_chunks: AtomicU64,
    /// The least any sender could have sent: the zstd-compressed size (level 3, or the
    /// raw size when that is smaller) of each distinct content sent, counted once.
    pub least_bytes: AtomicU64,
    /// Chunks whose hash came from the disk's hash cache instead of a read.
    pub cached_hashes: AtomicU64,
}

/// What the destination answered to the hash offers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Negotiated {
    /// Chunks to send, ascending in offer order.
    pub wanted: Vec<u64>,
    /// Held at the same offset.
    pub held: u64,
    /// Found elsewhere on the destination and copied there from a verified copy.
    pub deduped: u64,
    /// To be copied from another wanted chunk with the same content.
    pub copied: u64,
}

/// The reference level of `least_bytes`: zstd's default.
const LEAST_LEVEL: i32 = 3;

/// What the sender's worker thread owns while it runs.
struct SenderState {
    hashes: ChunkHashes,
    /// Offered contents shared by several chunks: if the chunk the destination chose to
    /// receive changed before it was sent, the others must be sent themselves.
    groups: HashMap<Digest, Vec<u64>>,
    /// Contents already sent once (for `least_bytes`).
    sent: HashSet<Digest>,
    /// Chunks this migration sent a frame for: the destination holds exactly the content
    /// `hashes` names there (nothing else writes its incoming disk before the switch, and
    /// after it the guest's own writes win over ours). A chunk marked dirty again whose
    /// content did not change (a rewrite of the same bytes) is then not sent again.
    delivered: Vec<bool>,
}

/// The source half: owns the source-side chunk hashes of one migration.
pub struct DiskSender {
    file: Arc<File>,
    state: Option<SenderState>,
    level: i32,
    frames_sent: u64,
    pub counters: Arc<DiskCounters>,
    /// Post-copy: hold every frame while a demanded chunk is being sent.
    yield_to: Option<Arc<super::postcopy::DemandGate>>,
    /// Hashes known without reading (`HashCache`), and which of them went stale.
    known: Option<(ChunkHashes, Vec<bool>)>,
}

struct Item {
    header: [u8; HEADER_LEN],
    body: Vec<u8>,
}

impl DiskSender {
    pub fn new(file: Arc<File>, disk_bytes: u64, chunk_size: u32, level: i32) -> DiskSender {
        DiskSender {
            file,
            state: Some(SenderState {
                hashes: ChunkHashes::new_zero(disk_bytes, chunk_size),
                groups: HashMap::new(),
                sent: HashSet::new(),
                delivered: vec![false; chunk_count(disk_bytes, chunk_size) as usize],
            }),
            level,
            frames_sent: 0,
            counters: Arc::default(),
            yield_to: None,
            known: None,
        }
    }

    /// Chunk hashes this disk is known to have, except where `stale`: a chunk the
    /// negotiation does not offer (unchanged since the destination's replica) is then
    /// not read to hash it. The seal still proves them: the destination hashes what it
    /// holds, so a wrong hash here fails the move rather than corrupt it.
    pub fn know(&mut self, hashes: ChunkHashes, stale: Vec<bool>) {
        let fits = self
            .state
            .as_ref()
            .is_some_and(|s| s.hashes.len() == hashes.len() && stale.len() as u64 == hashes.len());
        if fits {
            self.known = Some((hashes, stale));
        }
    }

    /// Write nothing while `gate` has demanded chunks in service (post-copy).
    pub fn yield_to(&mut self, gate: Arc<super::postcopy::DemandGate>) {
        self.yield_to = Some(gate);
    }

    pub fn set_level(&mut self, level: i32) {
        self.level = level;
    }

    /// The destination no longer counts on what it received for `chunks` (post-copy's
    /// pending chunks are missing to its back end until a frame arrives): send them
    /// even if unchanged.
    pub fn undeliver(&mut self, chunks: &[u64]) {
        if let Some(st) = self.state.as_mut() {
            for &c in chunks {
                if let Some(d) = st.delivered.get_mut(c as usize) {
                    *d = false;
                }
            }
        }
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
        let mut st = self
            .state
            .take()
            .ok_or_else(|| Error::Disk("sender used after a failed round".into()))?;
        let (tx, mut rx) = mpsc::channel::<Result<Item>>(32);
        let file = self.file.clone();
        let level = self.level;
        let counters = self.counters.clone();
        let worker = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; st.hashes.chunk_size() as usize];
            let mut queue: std::collections::VecDeque<u64> = chunks.into();
            while let Some(idx) = queue.pop_front() {
                let data = match read_chunk(&file, &st.hashes, idx, &mut buf) {
                    Ok(d) => d,
                    Err(e) => {
                        let _ = tx.blocking_send(Err(e));
                        break;
                    }
                };
                let (frame, body, hash) = DiskFrame::for_chunk(idx, data, level);
                let old = st.hashes.get(idx).copied();
                let delivered = st.delivered.get(idx as usize).copied().unwrap_or(false);
                if delivered && old == Some(hash) {
                    counters.held_chunks.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                st.hashes.set(idx, hash);
                if let Some(old) = old.filter(|o| *o != hash) {
                    // The destination may be waiting to copy `old` from this chunk.
                    if let Some(group) = st.groups.remove(&old) {
                        queue.extend(group.into_iter().filter(|&c| c != idx));
                    }
                }
                if frame.kind == Kind::Zero {
                    counters.zero_chunks.fetch_add(1, Ordering::Relaxed);
                    if skip_zero {
                        continue;
                    }
                } else {
                    counters
                        .raw_bytes
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                    if st.sent.insert(hash) {
                        let least = if level == LEAST_LEVEL {
                            body.len()
                        } else {
                            zstd::bulk::compress(data, LEAST_LEVEL)
                                .map_or(data.len(), |c| c.len().min(data.len()))
                        };
                        counters
                            .least_bytes
                            .fetch_add(least as u64, Ordering::Relaxed);
                    }
                }
                if let Some(d) = st.delivered.get_mut(idx as usize) {
                    *d = true;
                }
                let item = Item {
                    header: frame.encode_header(),
                    body,
                };
                if tx.blocking_send(Ok(item)).is_err() {
                    break; // the stream side failed; it reports why
                }
            }
            st
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
            if let Some(g) = &self.yield_to {
                g.idle().await;
            }
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
        let st = worker
            .await
            .map_err(|e| Error::Disk(format!("disk reader thread: {e}")))?;
        self.state = Some(st);
        result
    }

    /// The source's hash of every chunk (what the destination holds after the seal).
    pub fn hashes(&self) -> Option<&ChunkHashes> {
        self.state.as_ref().map(|s| &s.hashes)
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
    ) -> Result<Negotiated>
    where
        W: AsyncWrite + Unpin,
        R: AsyncRead + Unpin,
    {
        self.negotiate_inner(w, r, chunks, None).await
    }

    /// Like `negotiate`, to a destination whose base is a replica in a state this host
    /// knows: only `changed` (written since that state) is offered; every other chunk
    /// of `chunks` (the allocated ones) is hashed here for the seal but assumed held
    /// there, and the `Query` tells the destination to keep and hash what was not
    /// offered. A wrong assumption makes the seal's digests differ: the move aborts, it
    /// cannot corrupt. Changed chunks that are zero now are returned among the wanted
    /// ones (sent as `Zero` frames, which clear them there).
    pub async fn negotiate_changed<W, R>(
        &mut self,
        w: &mut W,
        r: &mut R,
        chunks: Vec<u64>,
        changed: &BTreeSet<u64>,
    ) -> Result<Negotiated>
    where
        W: AsyncWrite + Unpin,
        R: AsyncRead + Unpin,
    {
        let mut all: BTreeSet<u64> = chunks.into_iter().collect();
        let n = self.state.as_ref().map_or(0, |s| s.hashes.len());
        all.extend(changed.iter().copied().filter(|&c| c < n));
        self.negotiate_inner(w, r, all.into_iter().collect(), Some(changed.clone()))
            .await
    }

    async fn negotiate_inner<W, R>(
        &mut self,
        w: &mut W,
        r: &mut R,
        chunks: Vec<u64>,
        changed: Option<BTreeSet<u64>>,
    ) -> Result<Negotiated>
    where
        W: AsyncWrite + Unpin,
        R: AsyncRead + Unpin,
    {
        let only_changed = changed.is_some();
        let mut st = self
            .state
            .take()
            .ok_or_else(|| Error::Disk("sender used after a failed round".into()))?;
        let (tx, mut rx) = mpsc::channel::<Result<[u8; HEADER_LEN]>>(256);
        let file = self.file.clone();
        let known = self.known.take();
        let counters = self.counters.clone();
        let worker = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; st.hashes.chunk_size() as usize];
            let mut groups: HashMap<Digest, Vec<u64>> = HashMap::new();
            let mut zeroed = Vec::new();
            for idx in chunks {
                let offer = changed.as_ref().is_none_or(|c| c.contains(&idx));
                if !offer {
                    let cached = known.as_ref().and_then(|(h, stale)| {
                        let fresh = !stale.get(idx as usize).copied().unwrap_or(true);
                        h.get(idx).filter(|_| fresh).copied()
                    });
                    if let Some(h) = cached {
                        counters.cached_hashes.fetch_add(1, Ordering::Relaxed);
                        st.hashes.set(idx, h);
                        continue; // held there as it is (the seal checks it)
                    }
                }
                let data = match read_chunk(&file, &st.hashes, idx, &mut buf) {
                    Ok(d) => d,
                    Err(e) => {
                        let _ = tx.blocking_send(Err(e));
                        break;
                    }
                };
                let hash = *blake3::hash(data).as_bytes();
                st.hashes.set(idx, hash);
                if !offer {
                    continue; // held there as it is (the seal checks it)
                }
                if roam_migrate::frame::is_zero(data) {
                    if changed.is_some() {
                        zeroed.push(idx); // not cleared there unless sent
                    }
                    continue;
                }
                groups.entry(hash).or_default().push(idx);
                let h = DiskFrame::hash_of(idx, data.len() as u32, hash).encode_header();
                if tx.blocking_send(Ok(h)).is_err() {
                    break;
                }
            }
            groups.retain(|_, g| g.len() > 1);
            st.groups.extend(groups);
            (st, zeroed)
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
        let (st, zeroed) = worker
            .await
            .map_err(|e| Error::Disk(format!("disk reader thread: {e}")))?;
        self.state = Some(st);
        result?;
        self.counters
            .offered_chunks
            .fetch_add(offered, Ordering::Relaxed);
        let mut query = DiskFrame::control(Kind::Query, offered);
        if only_changed {
            query.hash[0] = QUERY_UNOFFERED_HELD;
        }
        w.write_all(&query.encode_header())
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
                Kind::WantEnd if f.index == wanted.len() as u64 => {
                    let (held, deduped, copied) = decode_counts(&f.hash);
                    if !zeroed.is_empty() {
                        wanted.extend(zeroed);
                        wanted.sort_unstable();
                        wanted.dedup();
                    }
                    self.counters.held_chunks.fetch_add(held, Ordering::Relaxed);
                    self.counters
                        .deduped_chunks
                        .fetch_add(deduped + copied, Ordering::Relaxed);
                    return Ok(Negotiated {
                        wanted,
                        held,
                        deduped,
                        copied,
                    });
                }
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
        let st = self
            .state
            .as_ref()
            .ok_or_else(|| Error::Disk("sender used after a failed round".into()))?;
        let root = st.hashes.root();
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

/// The base's chunk hashes, read and hashed by a thread from the moment the receiver
/// starts, while the source negotiates: at the `Query` the chunks the source did not
/// offer need no hashing on the critical path (0.33 s per GiB here). Only offered
/// chunks are ever written before the `Query`, so the hash of an unoffered one, read
/// at any moment before it, is still what the file holds.
struct PreHash {
    done: Arc<std::sync::Mutex<HashMap<u64, Digest>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl PreHash {
    fn spawn(file: Arc<File>, geometry: ChunkHashes, base: Vec<u64>) -> PreHash {
        let done: Arc<std::sync::Mutex<HashMap<u64, Digest>>> = Arc::default();
        let stop: Arc<std::sync::atomic::AtomicBool> = Arc::default();
        let (d, s) = (done.clone(), stop.clone());
        if !base.is_empty() {
            let _ = std::thread::Builder::new()
                .name("disk-prehash".into())
                .spawn(move || {
                    let mut buf = vec![0u8; geometry.chunk_size() as usize];
                    for c in base {
                        if s.load(Ordering::Relaxed) {
                            return;
                        }
                        // A failed read is simply not pre-hashed: the Query reads again.
                        if let Ok(data) = read_chunk(&file, &geometry, c, &mut buf) {
                            let h = *blake3::hash(data).as_bytes();
                            d.lock().unwrap_or_else(|p| p.into_inner()).insert(c, h);
                        }
                    }
                });
        }
        PreHash { done, stop }
    }

    fn get(&self, c: u64) -> Option<Digest> {
        self.done
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&c)
            .copied()
    }
}

impl Drop for PreHash {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// `WantEnd` carries the receiver's counts in its (otherwise unused) hash field:
/// held at the offset, found through the index, copied from another wanted chunk.
fn encode_counts(held: u64, deduped: u64, copied: u64) -> Digest {
    let mut h = [0u8; 32];
    h[0..8].copy_from_slice(&held.to_be_bytes());
    h[8..16].copy_from_slice(&deduped.to_be_bytes());
    h[16..24].copy_from_slice(&copied.to_be_bytes());
    h
}

fn decode_counts(h: &Digest) -> (u64, u64, u64) {
    let word = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&h[i..i + 8]);
        u64::from_be_bytes(b)
    };
    (word(0), word(8), word(16))
}

async fn read_reply<R: AsyncRead + Unpin>(r: &mut R) -> Result<DiskFrame> {
    let mut h = [0u8; HEADER_LEN];
    r.read_exact(&mut h)
        .await
        .map_err(|e| Error::io("receive from the destination's disk writer", e))?;
    DiskFrame::decode_header(&h).map_err(|e| Error::Disk(e.to_string()))
}

/// One disk frame and its body (`what` names the stream in errors). The body's length
/// is bounded by the header check before it is allocated.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    what: &str,
) -> Result<(DiskFrame, Vec<u8>)> {
    let mut h = [0u8; HEADER_LEN];
    r.read_exact(&mut h)
        .await
        .map_err(|e| Error::io(format!("receive {what}"), e))?;
    let frame = DiskFrame::decode_header(&h).map_err(|e| Error::Disk(e.to_string()))?;
    let mut body = vec![0u8; frame.body_len as usize];
    r.read_exact(&mut body)
        .await
        .map_err(|e| Error::io(format!("receive {what} body"), e))?;
    Ok((frame, body))
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

pub(crate) fn read_full(file: &File, buf: &mut [u8], off: u64) -> std::io::Result<()> {
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

impl SealOutcome {
    /// Post-copy's answer at the switchover: nothing is sealed yet, the guest may run
    /// (the seal comes when the background copy is done).
    pub fn postcopy_pending() -> SealOutcome {
        SealOutcome {
            ok: true,
            source_root: String::new(),
            dest_root: "post-copy".into(),
            frames_expected: 0,
            frames_received: 0,
        }
    }
}

/// Receives, at a successful seal, the hash of every non-zero chunk of the disk.
pub type OnSealed = Box<dyn FnOnce(Vec<(u64, Digest)>) + Send>;

/// The destination half: writes chunks into `file` and keeps their hashes.
pub struct DiskReceiver {
    file: Arc<File>,
    hashes: ChunkHashes,
    /// Allocated chunks of an older copy the file was seeded with (a return move).
    base: Vec<u64>,
    /// This host's dedup index: offered content found anywhere here is copied locally.
    index: Option<SharedIndex>,
    on_sealed: Option<OnSealed>,
    pub counters: Arc<DiskCounters>,
    /// Post-copy: chunks go through the on-demand back end (which never overwrites a
    /// guest write), and `Switch` activates it.
    ondemand: Option<Arc<roam_nbd::OnDemandBackend>>,
    /// Post-copy: told the number of pending chunks once `Switch` was applied.
    switched: Option<tokio::sync::oneshot::Sender<u64>>,
    /// The file is a disk lent in place (a replica here): every write goes through its
    /// undo log, so a failed migration can give it back as it was.
    undo: Option<SharedPromoted>,
}

pub use target::SharedPromoted;
use target::Target;

#[path = "disk_target.rs"]
mod target;

impl DiskReceiver {
    pub fn new(file: Arc<File>, disk_bytes: u64, chunk_size: u32) -> DiskReceiver {
        DiskReceiver {
            file,
            hashes: ChunkHashes::new_zero(disk_bytes, chunk_size),
            base: Vec::new(),
            index: None,
            on_sealed: None,
            counters: Arc::default(),
            ondemand: None,
            switched: None,
            undo: None,
        }
    }

    /// The file is a disk lent in place: write it only through `p` (its undo log).
    pub fn with_undo(mut self, p: SharedPromoted) -> DiskReceiver {
        self.undo = Some(p);
        self
    }

    /// Post-copy: write through `od` and report the switchover on `switched`.
    pub fn with_ondemand(
        mut self,
        od: Arc<roam_nbd::OnDemandBackend>,
        switched: tokio::sync::oneshot::Sender<u64>,
    ) -> DiskReceiver {
        self.ondemand = Some(od);
        self.switched = Some(switched);
        self
    }

    /// Look offered content up in this host's dedup index (`None`: no index).
    pub fn with_index(mut self, index: Option<SharedIndex>) -> DiskReceiver {
        self.index = index;
        self
    }

    /// Hand the disk's chunk hashes to `f` once the seal matched (to index the disk).
    pub fn on_sealed(mut self, f: OnSealed) -> DiskReceiver {
        self.on_sealed = Some(f);
        self
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
            index,
            on_sealed,
            counters,
            ondemand,
            mut switched,
            undo,
        } = self;
        let target = match undo {
            Some(p) => Target::Undo(p),
            None => Target::File(file.clone()),
        };
        // Valid only up to the first Query (see PreHash); dropped there.
        let mut prehash = Some(PreHash::spawn(file.clone(), hashes.clone(), base.clone()));
        let wcounters = counters.clone();
        let writer = tokio::task::spawn_blocking(move || -> Result<Option<SealOutcome>> {
            let mut received = 0u64;
            let mut offered = vec![false; hashes.len() as usize];
            let mut in_base = vec![false; hashes.len() as usize];
            for &c in &base {
                if let Some(b) = in_base.get_mut(c as usize) {
                    *b = true;
                }
            }
            let mut offers = OfferState::default();
            let mut buf = vec![0u8; hashes.chunk_size() as usize];
            let mut pending: Vec<u64> = Vec::new();
            while let Some((frame, body)) = rx.blocking_recv() {
                if frame.kind == Kind::Pending {
                    let runs = roam_migrate::frame::decode_pending(&body, hashes.len())
                        .map_err(|e| Error::Disk(e.to_string()))?;
                    for (first, n) in runs {
                        pending.extend(first..first + n);
                    }
                    continue;
                }
                if frame.kind == Kind::Switch {
                    let Some(od) = &ondemand else {
                        return Err(Error::Disk("switch frame outside post-copy".into()));
                    };
                    let n = pending.len() as u64;
                    od.activate(std::mem::take(&mut pending));
                    if let Some(s) = switched.take() {
                        let _ = s.send(n);
                    }
                    continue;
                }
                if frame.kind == Kind::Sync {
                    // "Written" must be true when the source reads the ack.
                    target.flush()?;
                    let _ = ack_tx.send(DiskFrame::sync(received).encode_header());
                    continue;
                }
                if frame.kind == Kind::Hash {
                    let (off, len) = hashes.range(frame.index).ok_or_else(|| {
                        Error::Disk(format!("offer for chunk {} beyond the disk", frame.index))
                    })?;
                    if frame.raw_len as usize != len {
                        return Err(Error::Disk(format!(
                            "offer for chunk {} has length {} but the chunk is {len}",
                            frame.index, frame.raw_len
                        )));
                    }
                    if let Some(o) = offered.get_mut(frame.index as usize) {
                        *o = true;
                    }
                    // 1. Held at this place already (an older copy of this disk)?
                    if in_base.get(frame.index as usize).copied().unwrap_or(false) {
                        let data = target.read(&hashes, frame.index, &mut buf)?;
                        if *blake3::hash(data).as_bytes() == frame.hash {
                            hashes.set(frame.index, frame.hash);
                            offers.held += 1;
                            continue;
                        }
                    }
                    // 2. Anywhere else on this host, verified?
                    if let Some(ix) = &index {
                        let found = ix
                            .read()
                            .unwrap_or_else(|e| e.into_inner())
                            .read_verified(&frame.hash, &mut buf[..len]);
                        match found {
                            Ok(Some(_)) => {
                                target.write(frame.index, off, &buf[..len])?;
                                hashes.set(frame.index, frame.hash);
                                offers.deduped += 1;
                                continue;
                            }
                            Ok(None) => {}
                            Err(e) => tracing::debug!("dedup index lookup: {e}"),
                        }
                    }
                    // 3./4. Coming for another chunk already, or wanted.
                    offers.want_or_wait(frame.index, frame.hash);
                    continue;
                }
                if frame.kind == Kind::Query {
                    let unoffered_held = frame.hash[0] == QUERY_UNOFFERED_HELD;
                    for &c in &base {
                        if offered.get(c as usize).copied().unwrap_or(true) {
                            continue;
                        }
                        if unoffered_held {
                            // Unchanged since the replica's batch, says the source: keep
                            // it, and hash what is really here so the seal proves it.
                            let h = match prehash.as_ref().and_then(|p| p.get(c)) {
                                Some(h) => h,
                                None => {
                                    *blake3::hash(target.read(&hashes, c, &mut buf)?).as_bytes()
                                }
                            };
                            hashes.set(c, h);
                            offers.held += 1;
                        } else if let Some((off, len)) = hashes.range(c) {
                            // What the source did not offer is zero there: clear it here.
                            target.clear(c, off, len)?;
                            hashes.set(c, zero_hash(len));
                        }
                        if let Some(o) = offered.get_mut(c as usize) {
                            *o = true; // a later round's query must not clear it
                        }
                    }
                    for &w in &offers.wants {
                        let _ = ack_tx.send(DiskFrame::control(Kind::Want, w).encode_header());
                    }
                    let mut end = DiskFrame::control(Kind::WantEnd, offers.wants.len() as u64);
                    end.hash = encode_counts(offers.held, offers.deduped, offers.copied);
                    wcounters
                        .held_chunks
                        .fetch_add(offers.held, Ordering::Relaxed);
                    wcounters
                        .deduped_chunks
                        .fetch_add(offers.deduped + offers.copied, Ordering::Relaxed);
                    // What the negotiation wrote (local copies, clears) reaches the file
                    // before the chunks the source now sends.
                    target.flush()?;
                    prehash = None;
                    let _ = ack_tx.send(end.encode_header());
                    offers.end_round();
                    continue;
                }
                if frame.kind == Kind::Seal {
                    target.sync()?;
                    let dest = hashes.root();
                    let complete = ondemand.as_ref().is_none_or(|od| od.is_complete());
                    let ok = dest == frame.hash && received == frame.index && complete;
                    if ok {
                        if let Some(f) = on_sealed {
                            let zero = zero_hash(hashes.chunk_size() as usize);
                            f((0..hashes.len())
                                .filter_map(|i| hashes.get(i).map(|h| (i, *h)))
                                .filter(|(_, h)| *h != zero)
                                .collect());
                        }
                    }
                    return Ok(Some(SealOutcome {
                        ok,
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
                // A chunk written directly is never overwritten by a pending copy.
                offers.pending.remove(&frame.index);
                if frame.kind == Kind::Zero {
                    match &ondemand {
                        Some(od) => od
                            .install_zero(frame.index)
                            .map(|_| ())
                            .map_err(|e| disk_write_error(frame.index, e))?,
                        None => target.clear(frame.index, off, len)?,
                    }
                    hashes.set(frame.index, zero_hash(len));
                } else {
                    let data = frame
                        .decode_body(&body)
                        .map_err(|e| Error::Disk(e.to_string()))?;
                    match &ondemand {
                        Some(od) => od
                            .install(frame.index, &data)
                            .map(|_| ())
                            .map_err(|e| disk_write_error(frame.index, e))?,
                        None => target.write(frame.index, off, &data)?,
                    }
                    hashes.set(frame.index, frame.hash);
                    wcounters.raw_bytes.fetch_add(len as u64, Ordering::Relaxed);
                    // Chunks of the same content that wait for this one.
                    for c in offers.resolve(&frame.hash) {
                        if let Some((coff, clen)) = hashes.range(c) {
                            if clen == data.len() {
                                target.write(c, coff, &data)?;
                                hashes.set(c, frame.hash);
                            }
                        }
                    }
                }
                received += 1;
                wcounters.chunks.fetch_add(1, Ordering::Relaxed);
            }
            Ok(None)
        });
        let read_result: Result<()> = async {
            loop {
                let (frame, body) = read_frame(r, "disk frame").await?;
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

/// The receiver's view of one negotiation (pure: testable without files).
#[derive(Debug, Default)]
struct OfferState {
    wants: Vec<u64>,
    /// Content → the chunk asked for it, in this negotiation.
    wanted_hash: HashMap<Digest, u64>,
    /// Chunk → the content it waits for (to be copied when that content arrives).
    pending: HashMap<u64, Digest>,
    waiting: HashMap<Digest, Vec<u64>>,
    held: u64,
    deduped: u64,
    copied: u64,
}

impl OfferState {
    fn want_or_wait(&mut self, chunk: u64, hash: Digest) {
        match self.wanted_hash.entry(hash) {
            std::collections::hash_map::Entry::Occupied(_) => {
                self.pending.insert(chunk, hash);
                self.waiting.entry(hash).or_default().push(chunk);
                self.copied += 1;
            }
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(chunk);
                self.wants.push(chunk);
            }
        }
    }

    /// Content `hash` arrived: the chunks still waiting for exactly it.
    fn resolve(&mut self, hash: &Digest) -> Vec<u64> {
        let Some(list) = self.waiting.remove(hash) else {
            return Vec::new();
        };
        list.into_iter()
            .filter(|c| {
                if self.pending.get(c) == Some(hash) {
                    self.pending.remove(c);
                    true
                } else {
                    false
                }
            })
            .collect()
    }

    /// The wants were answered; counts restart for a later negotiation. Pending copies
    /// stay until their content arrives.
    fn end_round(&mut self) {
        self.wants.clear();
        self.wanted_hash.clear();
        self.held = 0;
        self.deduped = 0;
        self.copied = 0;
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
    roam_store::promote::punch(file, off, len)
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
        // Chunk 63 was marked dirty too, but rewritten with the same bytes.
        sfile.write_all_at(&vec![1u8; cs], 63 * cs as u64).unwrap();
        sender.send(&mut a, vec![1, 5, 63], false).await.unwrap();
        sender.seal(&mut a).await.unwrap();
        let out = recv.await.unwrap().unwrap();
        assert!(out.ok, "{out:?}");
        // Only the 3 non-zero chunks + the 2 changed dirty chunks crossed.
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
        if let Some(st) = sender.state.as_mut() {
            st.hashes.set(9, [1u8; 32]);
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
        let neg = sender.negotiate(&mut a, &mut ar, all).await.unwrap();
        assert_eq!(neg.wanted, vec![3, 7, 20]);
        assert_eq!((neg.held, neg.deduped, neg.copied), (8, 0, 0));
        let wanted = neg.wanted;
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

#[cfg(test)]
#[path = "disk_dedup_tests.rs"]
mod dedup_tests;

#[cfg(test)]
#[path = "disk_replica_tests.rs"]
mod replica_tests;
