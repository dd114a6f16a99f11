//! Lock files that work on a registry shared by many hosts (NFS, Lustre), where `flock` is not
//! reliable: a lock is a file created exclusively (`O_EXCL`, atomic on NFSv3+ and Lustre) holding
//! its owner's host, pid and start time. The owner refreshes the file's modification time from a
//! background thread, so a lock whose owner died is recognised: on the same host because the pid
//! is gone, on any host because the heartbeat stopped. A stale lock is broken with a message.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A lock not refreshed for this long belongs to a dead owner (override with
/// `PEFT_WIT_LOCK_STALE_SECS`; the heartbeat runs at a tenth of it).
pub const DEFAULT_STALE_AFTER: Duration = Duration::from_secs(300);

/// Who holds a lock: written into the lock file when it is created.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LockOwner {
    pub host: String,
    pub pid: u32,
    /// The process's start time (Linux: clock ticks since boot), so a reused pid is not taken
    /// for the owner.
    #[serde(default)]
    pub process_start: Option<u64>,
    pub created_unix: u64,
    /// What the lock protects, for messages ("training wit-p0.2-r1").
    pub purpose: String,
    /// Distinguishes two locks of the same process (and a lock from its replacement).
    pub token: String,
}

impl std::fmt::Display for LockOwner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pid {} on {}, since {}",
            self.pid,
            self.host,
            format_unix(self.created_unix)
        )
    }
}

/// A held lock; the file is removed when this is dropped.
#[derive(Debug)]
pub struct LockFile {
    path: PathBuf,
    owner: LockOwner,
    stop: Arc<AtomicBool>,
    heartbeat: Option<std::thread::JoinHandle<()>>,
}

impl LockFile {
    /// Takes the lock at `path` or says who holds it. A stale lock is broken (with a message on
    /// stderr) and taken.
    pub fn try_acquire(
        path: &Path,
        purpose: &str,
    ) -> Result<std::result::Result<LockFile, LockOwner>> {
        Self::try_acquire_with(path, purpose, stale_after())
    }

    pub fn try_acquire_with(
        path: &Path,
        purpose: &str,
        stale_after: Duration,
    ) -> Result<std::result::Result<LockFile, LockOwner>> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        let owner = LockOwner::this_process(purpose);
        // Two rounds: the second after breaking a stale lock.
        for _ in 0..2 {
            match create_exclusive(path, &owner) {
                Ok(()) => return Ok(Ok(LockFile::held(path, owner, stale_after))),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(Error::io(path, e)),
            }
            match inspect(path, stale_after)? {
                // Released between our attempt and the look: try again.
                Holder::Gone => continue,
                Holder::Live(current) => return Ok(Err(current)),
                Holder::Stale(current, why) => {
                    if break_stale(path, &current)? {
                        eprintln!(
                            "warning: breaking the stale lock {} ({}; held by {current})",
                            path.display(),
                            why
                        );
                    }
                }
            }
        }
        match inspect(path, stale_after)? {
            Holder::Live(current) | Holder::Stale(current, _) => Ok(Err(current)),
            Holder::Gone => Err(Error::InvalidArgument(format!(
                "lock {}: could not be taken (it keeps changing hands)",
                path.display()
            ))),
        }
    }

    /// Waits (polling, up to `timeout`) until the lock is free, then takes it.
    pub fn acquire(path: &Path, purpose: &str, timeout: Duration) -> Result<LockFile> {
        let started = Instant::now();
        let mut delay = Duration::from_millis(5);
        let mut told = false;
        loop {
            match Self::try_acquire(path, purpose)? {
                Ok(lock) => return Ok(lock),
                Err(owner) => {
                    if started.elapsed() >= timeout {
                        return Err(Error::Locked {
                            path: path.to_path_buf(),
                            owner: owner.to_string(),
                        });
                    }
                    if !told && started.elapsed() > Duration::from_secs(5) {
                        eprintln!(
                            "waiting for the lock {} (held by {owner}: {})",
                            path.display(),
                            owner.purpose
                        );
                        told = true;
                    }
                }
            }
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_millis(250));
        }
    }

    fn held(path: &Path, owner: LockOwner, stale_after: Duration) -> LockFile {
        let stop = Arc::new(AtomicBool::new(false));
        let every = (stale_after / 10).max(Duration::from_millis(100));
        let heartbeat = {
            let (path, stop) = (path.to_path_buf(), stop.clone());
            std::thread::Builder::new()
                .name("lock-heartbeat".into())
                .spawn(move || {
                    let mut last = Instant::now();
                    while !stop.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(50).min(every));
                        if last.elapsed() >= every {
                            touch(&path);
                            last = Instant::now();
                        }
                    }
                })
                .ok()
        };
        LockFile {
            path: path.to_path_buf(),
            owner,
            stop,
            heartbeat,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn owner(&self) -> &LockOwner {
        &self.owner
    }
}

impl Drop for LockFile {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(handle) = self.heartbeat.take() {
            let _ = handle.join();
        }
        // Remove the file only while it is still ours (a peer may have judged us stale).
        if read_owner(&self.path).is_some_and(|o| o.token == self.owner.token) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// What a lock file says about its holder.
pub enum Holder {
    Gone,
    Live(LockOwner),
    Stale(LockOwner, String),
}

/// Reads the lock at `path` and judges whether its owner is alive (for status displays, too).
pub fn inspect(path: &Path, stale_after: Duration) -> Result<Holder> {
    let modified = match std::fs::metadata(path) {
        Ok(m) => m.modified().ok(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Holder::Gone),
        Err(e) => return Err(Error::io(path, e)),
    };
    let Some(owner) = read_owner(path) else {
        // Being written right now, or garbage: judge by age alone.
        let age = modified
            .and_then(|m| SystemTime::now().duration_since(m).ok())
            .unwrap_or_default();
        if age > stale_after.max(Duration::from_secs(2)) {
            let owner = LockOwner {
                host: "?".into(),
                pid: 0,
                process_start: None,
                created_unix: 0,
                purpose: "unreadable lock file".into(),
                token: String::new(),
            };
            return Ok(Holder::Stale(owner, "unreadable and old".into()));
        }
        return Ok(Holder::Live(LockOwner {
            host: "?".into(),
            pid: 0,
            process_start: None,
            created_unix: unix_now(),
            purpose: "a lock being written".into(),
            token: String::new(),
        }));
    };
    if owner.host == hostname() {
        if !process_alive(owner.pid, owner.process_start) {
            return Ok(Holder::Stale(
                owner,
                "its process is gone on this host".into(),
            ));
        }
        return Ok(Holder::Live(owner));
    }
    let age = modified
        .and_then(|m| SystemTime::now().duration_since(m).ok())
        .unwrap_or_default();
    if age > stale_after {
        let why = format!(
            "no heartbeat for {}s (limit {}s)",
            age.as_secs(),
            stale_after.as_secs()
        );
        return Ok(Holder::Stale(owner, why));
    }
    Ok(Holder::Live(owner))
}

/// The stale limit from `PEFT_WIT_LOCK_STALE_SECS`, or the default.
pub fn stale_after() -> Duration {
    std::env::var("PEFT_WIT_LOCK_STALE_SECS")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .filter(|s| *s > 0)
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_STALE_AFTER)
}

/// The owner of a lock file, if it can be read.
pub fn read_owner(path: &Path) -> Option<LockOwner> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

impl LockOwner {
    fn this_process(purpose: &str) -> LockOwner {
        let pid = std::process::id();
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        LockOwner {
            host: hostname(),
            pid,
            process_start: process_start(pid),
            created_unix: unix_now(),
            purpose: purpose.to_string(),
            token: format!("{}-{pid}-{nanos:x}-{:x}", hostname(), next_serial()),
        }
    }
}

fn next_serial() -> u64 {
    static SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    SERIAL.fetch_add(1, Ordering::Relaxed)
}

/// Creates the lock file only if none exists, with the owner inside (written before anyone can
/// judge it: a reader that finds it empty waits for it to fill or age).
fn create_exclusive(path: &Path, owner: &LockOwner) -> std::io::Result<()> {
    let mut file = std::fs::File::options()
        .write(true)
        .create_new(true)
        .open(path)?;
    let text = serde_json::to_string(owner).map_err(std::io::Error::other)?;
    let written = file
        .write_all(text.as_bytes())
        .and_then(|()| file.sync_all());
    if let Err(e) = written {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(())
}

/// Moves a stale lock aside and deletes it. Returns false when someone else got there first.
/// If the file moved aside turns out to be a fresh lock (taken between our look and the rename),
/// it is linked back, which cannot overwrite a newer one.
fn break_stale(path: &Path, judged: &LockOwner) -> Result<bool> {
    let aside = path.with_file_name(format!(
        ".{}.broken.{}",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        LockOwner::this_process("").token
    ));
    match std::fs::rename(path, &aside) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::io(path, e)),
    }
    let moved = read_owner(&aside);
    if moved.as_ref().map(|o| &o.token) != Some(&judged.token) && moved.is_some() {
        let _ = std::fs::hard_link(&aside, path);
        let _ = std::fs::remove_file(&aside);
        return Ok(false);
    }
    let _ = std::fs::remove_file(&aside);
    Ok(true)
}

fn touch(path: &Path) {
    if let Ok(file) = std::fs::File::options().append(true).open(path) {
        let _ = file.set_modified(SystemTime::now());
    }
}

/// Whether `pid` (started at `start`, when known) still runs on this host.
fn process_alive(pid: u32, start: Option<u64>) -> bool {
    if cfg!(target_os = "linux") {
        let stat = Path::new("/proc").join(pid.to_string());
        if !stat.exists() {
            return false;
        }
        match (start, process_start(pid)) {
            (Some(recorded), Some(now)) => recorded == now,
            _ => true,
        }
    } else {
        // No cheap, portable liveness check: fall back to the heartbeat's age.
        true
    }
}

/// Field 22 of `/proc/<pid>/stat`: the process's start time in clock ticks since boot.
fn process_start(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses; fields after it are plain.
    let after = &text[text.rfind(')')? + 1..];
    after.split_whitespace().nth(19)?.parse().ok()
}

/// This host's name (one path component).
pub fn hostname() -> String {
    let name = gethostname::gethostname().to_string_lossy().into_owned();
    let name = name.trim().replace(['/', '\\', ' '], "_");
    if name.is_empty() {
        "localhost".into()
    } else {
        name
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `2026-12-02 14:05:09 UTC`.
pub fn format_unix(secs: u64) -> String {
    strftime_utc(secs as i64, "%Y-%m-%d %H:%M:%S UTC")
}

/// Unix seconds formatted in UTC with strftime directives (`%Y`, `%b`, `%-d`, `%j`, ...); a
/// format chrono cannot read comes back as it is.
pub fn strftime_utc(secs: i64, fmt: &str) -> String {
    use std::fmt::Write;
    let Some(time) = chrono::DateTime::from_timestamp(secs, 0) else {
        return secs.to_string();
    };
    let mut out = String::new();
    match write!(out, "{}", time.format(fmt)) {
        Ok(()) => out,
        Err(_) => fmt.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_owner(path: &Path, owner: &LockOwner) {
        std::fs::write(path, serde_json::to_string(owner).unwrap()).unwrap();
    }

    fn foreign(host: &str, pid: u32) -> LockOwner {
        LockOwner {
            host: host.into(),
            pid,
            process_start: None,
            created_unix: unix_now(),
            purpose: "test".into(),
            token: format!("t-{host}-{pid}"),
        }
    }

    #[test]
    fn one_holder_at_a_time_and_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        let first = LockFile::try_acquire(&path, "first").unwrap().unwrap();
        let second = LockFile::try_acquire(&path, "second").unwrap();
        match second {
            Err(owner) => {
                assert_eq!(owner.purpose, "first");
                assert_eq!(owner.pid, std::process::id());
            }
            Ok(_) => panic!("a held lock was taken twice"),
        }
        drop(first);
        assert!(!path.exists());
        let third = LockFile::try_acquire(&path, "third").unwrap();
        assert!(third.is_ok());
    }

    #[test]
    fn a_dead_local_owner_is_broken() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        // pid_max on Linux is at most 2^22: this pid cannot exist.
        write_owner(&path, &foreign(&hostname(), 4_194_304 + 17));
        let lock = LockFile::try_acquire(&path, "me").unwrap();
        assert!(lock.is_ok(), "the dead owner's lock was not broken");
        assert_eq!(read_owner(&path).unwrap().purpose, "me");
    }

    #[test]
    fn another_hosts_lock_is_stale_only_without_heartbeat() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        write_owner(&path, &foreign("elsewhere", 1));
        let stale = Duration::from_secs(60);
        assert!(LockFile::try_acquire_with(&path, "me", stale)
            .unwrap()
            .is_err());
        let old = SystemTime::now() - Duration::from_secs(120);
        std::fs::File::options()
            .append(true)
            .open(&path)
            .unwrap()
            .set_modified(old)
            .unwrap();
        let lock = LockFile::try_acquire_with(&path, "me", stale).unwrap();
        assert!(lock.is_ok(), "a lock without heartbeat was not broken");
    }

    #[test]
    fn the_heartbeat_keeps_a_lock_fresh() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        let stale = Duration::from_millis(1000);
        let _lock = LockFile::try_acquire_with(&path, "me", stale)
            .unwrap()
            .unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        let age = SystemTime::now()
            .duration_since(std::fs::metadata(&path).unwrap().modified().unwrap())
            .unwrap();
        assert!(
            age < stale,
            "heartbeat did not refresh the lock: age {age:?}"
        );
    }

    #[test]
    fn many_threads_one_winner() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        let winners: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|i| {
                    let path = path.clone();
                    s.spawn(move || {
                        LockFile::try_acquire(&path, &format!("t{i}"))
                            .unwrap()
                            .ok()
                            .map(|l| {
                                std::thread::sleep(Duration::from_millis(200));
                                drop(l);
                            })
                            .is_some() as usize
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(winners, 1);
    }
}
