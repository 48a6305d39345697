//! CancelRequest routing: graywire gives each session its own BackendKeyData and remembers
//! which backend (node address and that backend's key) runs the session's queries right now,
//! so a cancel reaches the right process even after the session moved.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use dashmap::DashMap;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::protocol::startup::CancelKey;

/// Where a session's current query runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelTarget {
    /// Shared with the backend connection (a lease clones a pointer, not the name).
    pub host: Arc<str>,
    pub port: u16,
    pub key: CancelKey,
}

/// Why a CancelRequest was not forwarded.
#[derive(Debug, PartialEq, Eq)]
pub enum CancelOutcome {
    Forwarded,
    /// No session has that key (or the secret is wrong): ignored, as PostgreSQL does.
    UnknownKey,
    /// The session has no backend right now: nothing runs, nothing to cancel.
    Idle,
    /// The session's request was held waiting for a node; it is answered with 57014.
    HeldCancelled,
    Failed(String),
}

struct Entry {
    secret: u32,
    shared: Arc<Shared>,
}

/// What a session and the registry share: one allocation per session.
#[derive(Default)]
struct Shared {
    /// Written at every lease and release, read only by a CancelRequest: a plain lock costs
    /// less than an `ArcSwap` store (which pays every thread's outstanding read debts).
    target: Mutex<Option<CancelTarget>>,
    hold: HoldSignal,
}

impl Shared {
    fn target(&self) -> MutexGuard<'_, Option<CancelTarget>> {
        self.target.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Lets a CancelRequest reach a session whose request is held (it has no backend to cancel).
#[derive(Default)]
struct HoldSignal {
    holding: AtomicBool,
    cancelled: Notify,
}

/// All live sessions' keys.
pub struct CancelRegistry {
    sessions: DashMap<u32, Entry>,
    next_pid: AtomicU32,
}

impl Default for CancelRegistry {
    fn default() -> Self {
        CancelRegistry {
            sessions: DashMap::new(),
            // Start somewhere random so keys differ between graywire restarts.
            next_pid: AtomicU32::new(rand::random::<u32>() | 1),
        }
    }
}

/// A session's registration; dropping it forgets the key.
pub struct CancelHandle {
    registry: Arc<CancelRegistry>,
    key: CancelKey,
    shared: Arc<Shared>,
}

impl CancelHandle {
    /// The key graywire gave the client.
    pub fn key(&self) -> CancelKey {
        self.key
    }

    /// Points cancels at the session's current backend (or at nothing).
    pub fn set_target(&self, target: Option<CancelTarget>) {
        *self.shared.target() = target;
    }

    pub fn target(&self) -> Option<CancelTarget> {
        self.shared.target().clone()
    }

    /// What ends the session's held request when the client cancels it.
    pub fn hold_signal(&self) -> HoldCancel {
        HoldCancel(self.shared.clone())
    }

    /// See [`HoldCancel::cancellable`].
    pub async fn cancellable<T>(&self, held: impl std::future::Future<Output = T>) -> Option<T> {
        self.hold_signal().cancellable(held).await
    }
}

/// A session's held-request signal, apart from its handle (so the session can hold while it
/// changes itself).
pub struct HoldCancel(Arc<Shared>);

impl HoldCancel {
    /// Runs `held` (a request waiting for a node) until it finishes or the client cancels it;
    /// `None` when cancelled.
    pub async fn cancellable<T>(&self, held: impl std::future::Future<Output = T>) -> Option<T> {
        let hold = &self.0.hold;
        let cancelled = hold.cancelled.notified();
        tokio::pin!(cancelled);
        cancelled.as_mut().enable();
        hold.holding.store(true, Ordering::Release);
        let result = tokio::select! {
            r = held => Some(r),
            _ = cancelled => None,
        };
        hold.holding.store(false, Ordering::Release);
        result
    }
}

impl Drop for CancelHandle {
    fn drop(&mut self) {
        self.registry.sessions.remove(&self.key.pid);
    }
}

impl CancelRegistry {
    /// Allocates a key no live session holds.
    pub fn register(self: &Arc<Self>) -> CancelHandle {
        let shared = Arc::new(Shared::default());
        loop {
            let pid = self.next_pid.fetch_add(1, Ordering::Relaxed) & 0x7fff_ffff;
            if pid == 0 {
                continue;
            }
            let secret = rand::random::<u32>();
            if let dashmap::Entry::Vacant(v) = self.sessions.entry(pid) {
                v.insert(Entry {
                    secret,
                    shared: shared.clone(),
                });
                return CancelHandle {
                    registry: self.clone(),
                    key: CancelKey { pid, secret },
                    shared,
                };
            }
        }
    }

    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    fn lookup(&self, key: CancelKey) -> Result<Option<CancelTarget>, CancelOutcome> {
        let entry = self
            .sessions
            .get(&key.pid)
            .ok_or(CancelOutcome::UnknownKey)?;
        if entry.secret != key.secret {
            return Err(CancelOutcome::UnknownKey);
        }
        // A held request runs nowhere yet, even if the session keeps a backend connection.
        let hold = &entry.shared.hold;
        if hold.holding.load(Ordering::Acquire) {
            hold.cancelled.notify_waiters();
            return Err(CancelOutcome::HeldCancelled);
        }
        let target = entry.shared.target().clone();
        Ok(target)
    }

    /// Forwards a client's CancelRequest to the backend running that session's query, or
    /// ends the session's held request.
    pub async fn forward(&self, key: CancelKey, timeout: Duration) -> CancelOutcome {
        match self.lookup(key) {
            Err(outcome) => outcome,
            Ok(None) => CancelOutcome::Idle,
            Ok(Some(target)) => match send_cancel(&target, timeout).await {
                Ok(()) => CancelOutcome::Forwarded,
                Err(e) => CancelOutcome::Failed(e.to_string()),
            },
        }
    }
}

/// Sends one CancelRequest packet to a node, as a client would.
pub async fn send_cancel(target: &CancelTarget, timeout: Duration) -> std::io::Result<()> {
    let mut packet = [0u8; 16];
    packet[0..4].copy_from_slice(&16u32.to_be_bytes());
    packet[4..8].copy_from_slice(&80_877_102u32.to_be_bytes());
    packet[8..12].copy_from_slice(&target.key.pid.to_be_bytes());
    packet[12..16].copy_from_slice(&target.key.secret.to_be_bytes());
    let attempt = async {
        let mut s = TcpStream::connect((&*target.host, target.port)).await?;
        s.write_all(&packet).await?;
        s.shutdown().await
    };
    crate::timer::timeout(timeout, attempt)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "cancel timed out"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_unique_and_forgotten_on_drop() {
        let reg = Arc::new(CancelRegistry::default());
        let a = reg.register();
        let b = reg.register();
        assert_ne!(a.key().pid, b.key().pid);
        assert_eq!(reg.len(), 2);
        drop(a);
        assert_eq!(reg.len(), 1);
    }

    #[tokio::test]
    async fn wrong_secret_and_idle_sessions_are_not_forwarded() {
        let reg = Arc::new(CancelRegistry::default());
        let h = reg.register();
        let mut wrong = h.key();
        wrong.secret = wrong.secret.wrapping_add(1);
        let t = Duration::from_millis(100);
        assert_eq!(reg.forward(wrong, t).await, CancelOutcome::UnknownKey);
        assert_eq!(reg.forward(h.key(), t).await, CancelOutcome::Idle);
    }

    #[tokio::test]
    async fn a_cancel_ends_a_held_request() {
        let reg = Arc::new(CancelRegistry::default());
        let h = reg.register();
        let key = h.key();
        let reg2 = reg.clone();
        let canceller = tokio::spawn(async move {
            // Retry until the hold is registered (bounded).
            for _ in 0..100 {
                if reg2.forward(key, Duration::from_millis(100)).await
                    == CancelOutcome::HeldCancelled
                {
                    return true;
                }
                crate::timer::sleep(Duration::from_millis(5)).await;
            }
            false
        });
        let held = h
            .cancellable(crate::timer::sleep(Duration::from_secs(30)))
            .await;
        assert!(held.is_none(), "the hold ended by the cancel");
        assert!(canceller.await.expect("join"));
        // Not holding any more: a cancel finds nothing to do.
        assert_eq!(
            reg.forward(key, Duration::from_millis(100)).await,
            CancelOutcome::Idle
        );
    }

    #[tokio::test]
    async fn forwards_the_backend_key_to_the_target() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let reg = Arc::new(CancelRegistry::default());
        let h = reg.register();
        h.set_target(Some(CancelTarget {
            host: "127.0.0.1".into(),
            port,
            key: CancelKey { pid: 42, secret: 7 },
        }));
        let server = tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).await.expect("read");
            buf
        });
        assert_eq!(
            reg.forward(h.key(), Duration::from_secs(2)).await,
            CancelOutcome::Forwarded
        );
        let got = server.await.expect("join");
        assert_eq!(got.len(), 16);
        assert_eq!(&got[8..12], &42u32.to_be_bytes());
        assert_eq!(&got[12..16], &7u32.to_be_bytes());
    }
}
