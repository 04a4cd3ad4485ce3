//! The spool: every event the gateway makes is first appended to a local file, then sent
//! to Kafka from there, so no request it served goes unbilled when Kafka is away, slow,
//! or the gateway restarts.
//!
//! - Files: `spool_dir/seg-<n>.spool`, append-only, one record per event:
//!   `len u32 LE | crc32 u32 LE | key len u16 LE | key | event JSON`. A new process
//!   starts a new segment; older segments are only read.
//! - Durability: an event is written (the OS has it) before the response that produced
//!   it ends, so killing the process loses nothing that was answered; `fsync` runs every
//!   `gateway.spool_fsync_ms` (default 20 ms; 0 = before every answer), which bounds what
//!   a power loss can take. Requests still in flight when the process dies have no event
//!   yet: they are what a crash can lose (their clients saw the connection break).
//! - Sending: one task reads records in order and produces them to the usage topic
//!   (key = institution), awaiting each batch's acknowledgements; a failed batch is sent
//!   again from its start after a pause. A fully sent segment is deleted. A resend can
//!   repeat events Kafka already has: ingest deduplicates by event id, so nothing counts
//!   twice.
//! - Bound: `gateway.spool_max_bytes`. Past it the gateway answers 503 to new requests
//!   instead of serving what it could not bill (requests already admitted still write).
//!
//! A record cut short by a crash (the tail of the last segment) fails its length or
//! checksum and is dropped with a warning; it belonged to a request whose answer had not
//! ended.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::Notify;

use crate::config::KafkaConfig;

/// A segment is closed once it is this big.
const SEGMENT_BYTES: u64 = 8 * 1024 * 1024;
/// Records per produce batch.
const BATCH_RECORDS: usize = 2000;
const BATCH_BYTES: usize = 4 * 1024 * 1024;
/// Longest record accepted (an event is a few hundred bytes).
const MAX_RECORD: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("the spool is full ({0} bytes waiting for Kafka)")]
    Full(u64),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("seg-{n:020}.spool"))
}

fn segment_number(name: &str) -> Option<u64> {
    name.strip_prefix("seg-")?
        .strip_suffix(".spool")?
        .parse()
        .ok()
}

/// The segments in `dir`, oldest first.
fn segments(dir: &Path) -> Result<Vec<u64>, SpoolError> {
    let mut out: Vec<u64> = std::fs::read_dir(dir)
        .map_err(io_err(dir))?
        .filter_map(|e| e.ok())
        .filter_map(|e| segment_number(&e.file_name().to_string_lossy()))
        .collect();
    out.sort_unstable();
    Ok(out)
}

fn encode(key: &str, event: &[u8]) -> Vec<u8> {
    let mut payload = Vec::with_capacity(2 + key.len() + event.len());
    payload.extend_from_slice(&(key.len() as u16).to_le_bytes());
    payload.extend_from_slice(key.as_bytes());
    payload.extend_from_slice(event);
    let mut rec = Vec::with_capacity(8 + payload.len());
    rec.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    rec.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    rec.extend_from_slice(&payload);
    rec
}

/// One record read back: (key, event), and its length on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub key: String,
    pub event: Vec<u8>,
    pub len: u64,
}

/// Decodes the record at the start of `buf`; `None` if it is incomplete or damaged.
fn decode(buf: &[u8]) -> Option<Record> {
    let len = u32::from_le_bytes(buf.get(..4)?.try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(buf.get(4..8)?.try_into().ok()?);
    if len > MAX_RECORD + 2 + u16::MAX as usize {
        return None;
    }
    let payload = buf.get(8..8 + len)?;
    if crc32fast::hash(payload) != crc {
        return None;
    }
    let klen = u16::from_le_bytes(payload.get(..2)?.try_into().ok()?) as usize;
    let key = std::str::from_utf8(payload.get(2..2 + klen)?)
        .ok()?
        .to_owned();
    Some(Record {
        key,
        event: payload[2 + klen..].to_vec(),
        len: (8 + len) as u64,
    })
}

struct Active {
    number: u64,
    file: File,
    len: u64,
}

struct Inner {
    dir: PathBuf,
    max_bytes: u64,
    fsync_each: bool,
    active: Mutex<Active>,
    /// Bytes in all segments not yet deleted.
    on_disk: AtomicU64,
    /// Bytes of the active segment written (readable by the sender).
    active_len: AtomicU64,
    active_number: AtomicU64,
    dirty: AtomicBool,
    wake: Notify,
    /// Records the sender has had acknowledged since start (for tests and logs).
    sent: AtomicU64,
    appended: AtomicU64,
}

/// The spool; cheap to clone.
#[derive(Clone)]
pub struct Spool {
    inner: Arc<Inner>,
}

impl Spool {
    /// Opens `dir` (created if needed) and starts a new segment after any left there.
    pub fn open(dir: &Path, max_bytes: u64, fsync_ms: u64) -> Result<Self, SpoolError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let existing = segments(dir)?;
        let mut on_disk = 0;
        for n in &existing {
            let p = segment_path(dir, *n);
            on_disk += std::fs::metadata(&p).map_err(io_err(&p))?.len();
        }
        let number = existing.last().map_or(1, |n| n + 1);
        let path = segment_path(dir, number);
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        // The new file's name must survive a power loss too.
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        if !existing.is_empty() {
            tracing::info!(
                segments = existing.len(),
                bytes = on_disk,
                "spool holds events from an earlier run; sending them"
            );
        }
        Ok(Self {
            inner: Arc::new(Inner {
                dir: dir.to_owned(),
                max_bytes,
                fsync_each: fsync_ms == 0,
                active: Mutex::new(Active {
                    number,
                    file,
                    len: 0,
                }),
                on_disk: AtomicU64::new(on_disk),
                active_len: AtomicU64::new(0),
                active_number: AtomicU64::new(number),
                dirty: AtomicBool::new(false),
                wake: Notify::new(),
                sent: AtomicU64::new(0),
                appended: AtomicU64::new(0),
            }),
        })
    }

    /// Whether a new request may be served (its event will fit).
    pub fn has_room(&self) -> Result<(), SpoolError> {
        let used = self.inner.on_disk.load(Ordering::Relaxed);
        if used >= self.inner.max_bytes {
            return Err(SpoolError::Full(used));
        }
        Ok(())
    }

    /// Bytes waiting (written, not yet deleted after sending).
    pub fn pending_bytes(&self) -> u64 {
        self.inner.on_disk.load(Ordering::Relaxed)
    }

    pub fn appended(&self) -> u64 {
        self.inner.appended.load(Ordering::Relaxed)
    }

    pub fn sent(&self) -> u64 {
        self.inner.sent.load(Ordering::Relaxed)
    }

    /// Appends one event (keyed by its institution). Returns once the OS has it (and, with
    /// `spool_fsync_ms = 0`, the disk).
    pub fn append(&self, key: &str, event: &[u8]) -> Result<(), SpoolError> {
        if event.len() > MAX_RECORD || key.len() > usize::from(u16::MAX) {
            return Err(SpoolError::Io {
                path: self.inner.dir.display().to_string(),
                source: std::io::Error::other("an event larger than 1 MiB"),
            });
        }
        let rec = encode(key, event);
        let inner = &*self.inner;
        let mut active = inner.active.lock().expect("spool lock");
        if active.len >= SEGMENT_BYTES {
            let number = active.number + 1;
            let path = segment_path(&inner.dir, number);
            let file = OpenOptions::new()
                .create_new(true)
                .append(true)
                .open(&path)
                .map_err(io_err(&path))?;
            // The closed segment is complete on disk before the sender may delete it.
            let _ = active.file.sync_data();
            *active = Active {
                number,
                file,
                len: 0,
            };
            inner.active_len.store(0, Ordering::Release);
            inner.active_number.store(number, Ordering::Release);
        }
        let path = segment_path(&inner.dir, active.number);
        active.file.write_all(&rec).map_err(io_err(&path))?;
        if inner.fsync_each {
            active.file.sync_data().map_err(io_err(&path))?;
        } else {
            inner.dirty.store(true, Ordering::Release);
        }
        active.len += rec.len() as u64;
        inner.active_len.store(active.len, Ordering::Release);
        inner.on_disk.fetch_add(rec.len() as u64, Ordering::Relaxed);
        inner.appended.fetch_add(1, Ordering::Relaxed);
        drop(active);
        inner.wake.notify_one();
        Ok(())
    }

    /// Flushes what was written to disk (the periodic fsync).
    pub fn sync(&self) {
        if !self.inner.dirty.swap(false, Ordering::AcqRel) {
            return;
        }
        let file = {
            let active = self.inner.active.lock().expect("spool lock");
            active.file.try_clone()
        };
        if let Ok(f) = file {
            if let Err(e) = f.sync_data() {
                tracing::error!(error = %e, "spool fsync failed");
            }
        }
    }

    /// Runs the fsync timer and the sender until `stop` fires; then sends what it can
    /// for up to `grace` and returns.
    pub async fn run(
        self,
        kafka: KafkaConfig,
        topic: String,
        fsync_ms: u64,
        mut stop: tokio::sync::watch::Receiver<bool>,
        grace: Duration,
    ) {
        if fsync_ms > 0 {
            let me = self.clone();
            let mut stop = stop.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(fsync_ms));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = stop.changed() => { me.sync(); return; }
                    }
                    let me2 = me.clone();
                    let _ = tokio::task::spawn_blocking(move || me2.sync()).await;
                }
            });
        }
        let producer: FutureProducer = match crate::kafka::client_config(&kafka)
            .set("message.timeout.ms", "15000")
            .set("linger.ms", "5")
            .set("acks", "all")
            .create()
        {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "cannot create the spool's Kafka producer");
                return;
            }
        };
        let mut sender = Sender {
            spool: self.clone(),
            producer,
            topic,
            segment: None,
            offset: 0,
            backoff: Duration::from_millis(500),
        };
        let mut stopping_at: Option<tokio::time::Instant> = None;
        loop {
            if stopping_at.is_none() && *stop.borrow() {
                stopping_at = Some(tokio::time::Instant::now() + grace);
            }
            if stopping_at.is_some_and(|t| tokio::time::Instant::now() >= t) {
                return;
            }
            match sender.step().await {
                Step::Sent => {}
                Step::Idle => {
                    if stopping_at.is_some() {
                        return;
                    }
                    tokio::select! {
                        _ = self.inner.wake.notified() => {}
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = stop.changed() => {}
                    }
                }
                Step::Failed => {
                    let pause = sender.backoff;
                    sender.backoff = (sender.backoff * 2).min(Duration::from_secs(10));
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = stop.changed() => {}
                    }
                }
            }
        }
    }
}

enum Step {
    Sent,
    Idle,
    Failed,
}

struct Sender {
    spool: Spool,
    producer: FutureProducer,
    topic: String,
    /// The segment being read and the offset of its first unsent record.
    segment: Option<u64>,
    offset: u64,
    backoff: Duration,
}

impl Sender {
    /// Reads the next batch of records of the current segment (up to what is written).
    fn read_batch(&mut self) -> Result<Option<(u64, Vec<Record>, bool)>, SpoolError> {
        let inner = &self.spool.inner;
        let seg = match self.segment {
            Some(s) => s,
            None => match segments(&inner.dir)?.first() {
                Some(s) => {
                    self.segment = Some(*s);
                    self.offset = 0;
                    *s
                }
                None => return Ok(None),
            },
        };
        let active = inner.active_number.load(Ordering::Acquire);
        let path = segment_path(&inner.dir, seg);
        let end = if seg == active {
            inner.active_len.load(Ordering::Acquire)
        } else {
            std::fs::metadata(&path).map_err(io_err(&path))?.len()
        };
        let sealed = seg != active;
        if self.offset >= end {
            return Ok(Some((seg, Vec::new(), sealed)));
        }
        let mut f = File::open(&path).map_err(io_err(&path))?;
        f.seek(SeekFrom::Start(self.offset))
            .map_err(io_err(&path))?;
        let want = (end - self.offset).min(BATCH_BYTES as u64 + MAX_RECORD as u64 + 64) as usize;
        let mut buf = vec![0u8; want];
        f.read_exact(&mut buf).map_err(io_err(&path))?;
        let mut records = Vec::new();
        let mut at = 0usize;
        let mut bytes = 0usize;
        while records.len() < BATCH_RECORDS && bytes < BATCH_BYTES {
            match decode(&buf[at..]) {
                Some(r) => {
                    at += r.len as usize;
                    bytes += r.len as usize;
                    records.push(r);
                }
                None if records.is_empty() && at < buf.len() => {
                    // The first unsent record does not decode. Records are written whole
                    // and `active_len` moves after the write, so this is a tail torn by
                    // a crash (or damage): the rest of this segment is unreadable. Its
                    // request never finished answering.
                    tracing::warn!(
                        segment = %path.display(),
                        at = self.offset,
                        bytes = end - self.offset,
                        "dropping a damaged record at the end of a spool segment"
                    );
                    self.offset = end;
                    return Ok(Some((seg, Vec::new(), sealed)));
                }
                // The end of what was read (or a record beyond this window).
                None => break,
            }
        }
        Ok(Some((seg, records, sealed)))
    }

    async fn step(&mut self) -> Step {
        let batch = match self.read_batch() {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "reading the spool");
                return Step::Failed;
            }
        };
        let Some((seg, records, sealed)) = batch else {
            return Step::Idle;
        };
        if records.is_empty() {
            if sealed {
                // Everything in it was sent: delete it and go on with the next one.
                let path = segment_path(&self.spool.inner.dir, seg);
                let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                if let Err(e) = std::fs::remove_file(&path) {
                    tracing::error!(error = %e, segment = %path.display(), "cannot delete a sent spool segment");
                    return Step::Failed;
                }
                self.spool.inner.on_disk.fetch_sub(
                    size.min(self.spool.inner.on_disk.load(Ordering::Relaxed)),
                    Ordering::Relaxed,
                );
                self.segment = None;
                self.offset = 0;
                return Step::Sent;
            }
            return Step::Idle;
        }
        let mut deliveries = Vec::with_capacity(records.len());
        for r in &records {
            let record = FutureRecord::to(&self.topic).key(&r.key).payload(&r.event);
            match self.producer.send_result(record) {
                Ok(d) => deliveries.push(d),
                Err((e, _)) => {
                    tracing::warn!(error = %e, "Kafka refused an event from the spool; retrying the batch");
                    return Step::Failed;
                }
            }
        }
        let mut failed = None;
        for d in deliveries {
            match d.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => failed = Some(e.to_string()),
                Err(_) => failed = Some("delivery cancelled".into()),
            }
        }
        if let Some(e) = failed {
            tracing::warn!(error = %e, events = records.len(), "sending spooled events failed; they stay spooled and are sent again");
            return Step::Failed;
        }
        let bytes: u64 = records.iter().map(|r| r.len).sum();
        self.offset += bytes;
        self.backoff = Duration::from_millis(500);
        self.spool
            .inner
            .sent
            .fetch_add(records.len() as u64, Ordering::Relaxed);
        Step::Sent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_damage_is_detected() {
        let rec = encode("uni-oslo", br#"{"event_id":"e1"}"#);
        let r = decode(&rec).unwrap();
        assert_eq!(r.key, "uni-oslo");
        assert_eq!(r.event, br#"{"event_id":"e1"}"#);
        assert_eq!(r.len, rec.len() as u64);
        // Cut short anywhere: incomplete.
        for cut in 0..rec.len() {
            assert_eq!(decode(&rec[..cut]), None, "cut at {cut}");
        }
        // One flipped bit: the checksum fails.
        let mut bad = rec.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert_eq!(decode(&bad), None);
    }

    #[test]
    fn appends_survive_a_reopen_and_segments_are_numbered_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path(), 1 << 20, 20).unwrap();
        s.append("a", b"{}").unwrap();
        s.append("b", b"{\"x\":1}").unwrap();
        assert!(s.pending_bytes() > 0);
        drop(s);
        let s2 = Spool::open(dir.path(), 1 << 20, 0).unwrap();
        assert_eq!(segments(dir.path()).unwrap(), vec![1, 2]);
        let mut sender = Sender {
            spool: s2.clone(),
            producer: crate::kafka::client_config(&KafkaConfig::default())
                .create()
                .unwrap(),
            topic: "t".into(),
            segment: None,
            offset: 0,
            backoff: Duration::from_millis(1),
        };
        let (seg, records, sealed) = sender.read_batch().unwrap().unwrap();
        assert_eq!(seg, 1);
        assert!(sealed);
        assert_eq!(
            records.iter().map(|r| r.key.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
    }

    #[test]
    fn a_full_spool_refuses_new_work() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path(), 100, 20).unwrap();
        assert!(s.has_room().is_ok());
        s.append("k", &[b'x'; 200]).unwrap();
        assert!(matches!(s.has_room(), Err(SpoolError::Full(_))));
    }
}
