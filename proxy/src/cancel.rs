//! CancelRequest routing: graywire gives each session its own BackendKeyData and remembers
//! which backend (node address and that backend's key) runs the session's queries right now,
//! so a cancel reaches the right process even after the session moved. The key's pid is the
//! pid of the session's first backend (as `pg_backend_pid()` reports it there); its secret is
//! graywire's own, so a key is found by pid and secret together.

use std::sync::atomic::{AtomicBool, Ordering};
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
    shared: Arc<Shared>,
}

/// A key as the registry looks it up: pid and secret together (two sessions may advertise
/// the same pid: their first backends ran on different nodes, or one after the other).
fn key_id(key: CancelKey) -> u64 {
    (u64::from(key.pid) << 32) | u64::from(key.secret)
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
#[derive(Default)]
pub struct CancelRegistry {
    sessions: DashMap<u64, Entry>,
}

/// A session's registration; dropping it forgets the key.
pub struct CancelHandle {
    registry: Arc<CancelRegistry>,
    /// Registered once the session knows its first backend's pid ([`CancelHandle::adopt_pid`]);
    /// before that the client has no key to cancel with.
    key: Option<CancelKey>,
    shared: Arc<Shared>,
}

impl CancelHandle {
    /// The key graywire gave the client, once it has one.
    pub fn key(&self) -> Option<CancelKey> {
        self.key
    }

    /// Registers the session under `pid` (its first backend's) and a fresh secret: the key the
    /// client is told.
    pub fn adopt_pid(&mut self, pid: u32) -> CancelKey {
        let registry = &self.registry;
        if let Some(old) = self.key.take() {
            registry.sessions.remove(&key_id(old));
        }
        let key = registry.insert(pid, &self.shared);
        self.key = Some(key);
        key
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
        if let Some(key) = self.key {
            self.registry.sessions.remove(&key_id(key));
        }
    }
}

impl CancelRegistry {
    /// A session's handle, not yet registered: the session registers it with its first
    /// backend's pid ([`CancelHandle::adopt_pid`]) before greeting the client, so a session
    /// costs one registry insert.
    pub fn register(self: &Arc<Self>) -> CancelHandle {
        CancelHandle {
            registry: self.clone(),
            key: None,
            shared: Arc::new(Shared::default()),
        }
    }

    /// Registers `shared` under `pid` and a secret that makes the key unique.
    fn insert(&self, pid: u32, shared: &Arc<Shared>) -> CancelKey {
        loop {
            let key = CancelKey {
                pid,
                secret: rand::random::<u32>(),
            };
            if let dashmap::Entry::Vacant(v) = self.sessions.entry(key_id(key)) {
                v.insert(Entry {
                    shared: shared.clone(),
                });
                return key;
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
            .get(&key_id(key))
            .ok_or(CancelOutcome::UnknownKey)?;
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
    fn sessions_may_advertise_the_same_pid_and_keep_their_own_keys() {
        let reg = Arc::new(CancelRegistry::default());
        let mut a = reg.register();
        let mut b = reg.register();
        assert_eq!(a.adopt_pid(7).pid, 7);
        let (ka, kb) = (a.adopt_pid(4242), b.adopt_pid(4242));
        assert_eq!((ka.pid, kb.pid), (4242, 4242));
        assert_ne!(ka, kb);
        assert_eq!(reg.len(), 2, "adopting a pid again replaces the key");
        let target = |port| CancelTarget {
            host: Arc::from("127.0.0.1"),
            port,
            key: CancelKey { pid: 1, secret: 2 },
        };
        a.set_target(Some(target(1)));
        b.set_target(Some(target(2)));
        assert_eq!(reg.lookup(ka).ok().flatten().map(|t| t.port), Some(1));
        assert_eq!(reg.lookup(kb).ok().flatten().map(|t| t.port), Some(2));
        let wrong = CancelKey {
            pid: 4242,
            secret: ka.secret ^ 1,
        };
        if wrong != kb {
            assert_eq!(reg.lookup(wrong).err(), Some(CancelOutcome::UnknownKey));
        }
        drop(a);
        assert_eq!(reg.len(), 1);
        assert!(reg.lookup(kb).is_ok());
    }

    #[test]
    fn keys_are_unique_and_forgotten_on_drop() {
        let reg = Arc::new(CancelRegistry::default());
        let mut a = reg.register();
        let mut b = reg.register();
        assert_eq!(reg.len(), 0, "nothing is registered before the greeting");
        a.adopt_pid(1);
        b.adopt_pid(2);
        assert_ne!(a.key(), b.key());
        assert_eq!(reg.len(), 2);
        drop(a);
        assert_eq!(reg.len(), 1);
    }

    #[tokio::test]
    async fn wrong_secret_and_idle_sessions_are_not_forwarded() {
        let reg = Arc::new(CancelRegistry::default());
        let mut h = reg.register();
        let key = h.adopt_pid(42);
        let mut wrong = key;
        wrong.secret = wrong.secret.wrapping_add(1);
        let t = Duration::from_millis(100);
        assert_eq!(reg.forward(wrong, t).await, CancelOutcome::UnknownKey);
        assert_eq!(reg.forward(key, t).await, CancelOutcome::Idle);
    }

    #[tokio::test]
    async fn a_cancel_ends_a_held_request() {
        let reg = Arc::new(CancelRegistry::default());
        let mut h = reg.register();
        let key = h.adopt_pid(42);
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
        let mut h = reg.register();
        let key = h.adopt_pid(42);
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
            reg.forward(key, Duration::from_secs(2)).await,
            CancelOutcome::Forwarded
        );
        let got = server.await.expect("join");
        assert_eq!(got.len(), 16);
        assert_eq!(&got[8..12], &42u32.to_be_bytes());
        assert_eq!(&got[12..16], &7u32.to_be_bytes());
    }
}
