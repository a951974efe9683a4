//! Which proxy server replicas the agent holds tunnels to.
//!
//! Every server says its id and the number of replicas (its `--server-count`)
//! in the hello that opens a tunnel. The agent keeps **at most one tunnel per
//! server id**, whichever address reached it: a tunnel whose hello names a
//! server the agent already holds a tunnel to is a duplicate, refused with
//! `ALREADY_EXISTS` and retried later (through a load balancer, the next
//! connection may land on another replica).
//!
//! How many tunnels an address wants depends on the count the server told:
//!
//! - **1** (or 0, from an older server): one tunnel per resolved address, as
//!   when every replica has an address of its own (a headless Service). Such
//!   tunnels are never refused as duplicates: with one replica there is no
//!   other to find, and nothing changes for agents of single servers.
//! - **N > 1**: the address may be a load balancer in front of N replicas. It
//!   keeps opening tunnels (at most N of its own) until the agent holds tunnels
//!   to N distinct server ids *of the same `--server` entry* — ids reached
//!   through any address that entry resolves to, counting the ids a refused
//!   duplicate showed. So a headless name with one address per replica is
//!   satisfied once each address has its tunnel, a load balancer's one address
//!   fills up to N, and two entries naming two different hubs are counted
//!   apart. N is capped at [`MAX_SERVER_COUNT`].

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

/// The largest server count the agent follows (the server refuses a larger
/// `--server-count`); a server claiming more is logged and treated as this many.
pub use tunnel_proto::MAX_SERVER_COUNT;

/// The count an agent acts on for a server's advertised `server_count`:
/// 0 (unknown, an older server) means 1, and at most [`MAX_SERVER_COUNT`].
pub fn effective_count(advertised: u32) -> u32 {
    advertised.clamp(1, MAX_SERVER_COUNT)
}

/// Whether an address should open one more tunnel.
///
/// `server_count` is the effective count last told through the address,
/// `own` the tunnels the address holds, `covered` the distinct servers of its
/// `--server` entry the agent holds tunnels to ([`ServerIds::covered`]).
pub fn needs_tunnel(server_count: u32, own: usize, covered: usize) -> bool {
    let n = server_count as usize;
    if n <= 1 {
        own == 0
    } else {
        own < n && covered < n
    }
}

/// A hello from a server the agent already holds a tunnel to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Duplicate {
    /// The server's id.
    pub server_id: String,
}

impl std::fmt::Display for Duplicate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the agent already holds a tunnel to server {:?}; closing this duplicate connection",
            self.server_id
        )
    }
}

/// One server id the agent holds tunnels to.
#[derive(Debug, Default)]
struct HeldServer {
    /// Tunnels to it that are up (more than one only with a count of 1).
    tunnels: usize,
    /// Of those, the ones the server asked to leave (it is shutting down):
    /// still held, so that no new tunnel goes to it, but no longer covering it.
    leaving: usize,
    /// The `--server` entries through which it was reached.
    seen_via: HashSet<Arc<str>>,
}

/// The bookkeeping of held server ids, without locking or notification.
#[derive(Debug, Default)]
pub struct ServerIds {
    held: HashMap<String, HeldServer>,
}

impl ServerIds {
    /// Records a hello from `server_id` (telling `server_count`) reached
    /// through `entry`. `Ok(true)`: the tunnel holds the id and must
    /// [`release`](Self::release) it when it ends; `Ok(false)`: the tunnel
    /// may stay but holds nothing (the server sent no id); `Err`: a duplicate.
    pub fn admit(
        &mut self,
        entry: &Arc<str>,
        server_id: &str,
        server_count: u32,
    ) -> Result<bool, Duplicate> {
        if server_id.is_empty() {
            return Ok(false);
        }
        if effective_count(server_count) > 1
            && let Some(held) = self.held.get_mut(server_id)
        {
            held.seen_via.insert(entry.clone());
            return Err(Duplicate {
                server_id: server_id.to_owned(),
            });
        }
        let held = self.held.entry(server_id.to_owned()).or_default();
        held.tunnels += 1;
        held.seen_via.insert(entry.clone());
        Ok(true)
    }

    /// Forgets one tunnel to `server_id` (one that was leaving, if
    /// `leaving`); the id is no longer held once its last tunnel is gone.
    pub fn release(&mut self, server_id: &str, leaving: bool) {
        if let Some(held) = self.held.get_mut(server_id) {
            held.tunnels = held.tunnels.saturating_sub(1);
            if leaving {
                held.leaving = held.leaving.saturating_sub(1);
            }
            if held.tunnels == 0 {
                self.held.remove(server_id);
            }
        }
    }

    /// Marks one tunnel to `server_id` as leaving: the server is shutting
    /// down, so it no longer counts as covered, while a new connection that
    /// reaches it is still refused as a duplicate.
    pub fn leave(&mut self, server_id: &str) {
        if let Some(held) = self.held.get_mut(server_id) {
            held.leaving = (held.leaving + 1).min(held.tunnels);
        }
    }

    /// How many distinct servers reached through `entry` the agent holds
    /// tunnels to (through any address), not counting servers that are
    /// shutting down.
    pub fn covered(&self, entry: &str) -> usize {
        self.held
            .values()
            .filter(|h| h.tunnels > h.leaving && h.seen_via.contains(entry))
            .count()
    }

    /// Whether the agent holds a tunnel to `server_id`.
    pub fn holds(&self, server_id: &str) -> bool {
        self.held.contains_key(server_id)
    }
}

/// The agent-wide [`ServerIds`], shared by every tunnel, with a notification
/// whenever it changes so that addresses waiting for a server to go away
/// can re-fill.
#[derive(Debug)]
pub struct ServerRegistry {
    ids: Mutex<ServerIds>,
    changed: watch::Sender<u64>,
}

impl Default for ServerRegistry {
    fn default() -> Self {
        Self {
            ids: Mutex::new(ServerIds::default()),
            changed: watch::Sender::new(0),
        }
    }
}

impl ServerRegistry {
    fn lock(&self) -> MutexGuard<'_, ServerIds> {
        // The bookkeeping stays consistent even if a holder panicked.
        self.ids.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn notify(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Admits a tunnel whose hello came from `server_id` through `entry` (see
    /// [`ServerIds::admit`]); the returned claim holds the id until dropped.
    pub fn admit(
        self: &Arc<Self>,
        entry: &Arc<str>,
        server_id: &str,
        server_count: u32,
    ) -> Result<Claim, Duplicate> {
        let held = self.lock().admit(entry, server_id, server_count);
        self.notify();
        Ok(Claim {
            registry: self.clone(),
            server_id: held?.then(|| server_id.to_owned()),
            leaving: false,
        })
    }

    /// Tells every subscriber that something changed.
    pub fn touch(&self) {
        self.notify();
    }

    /// See [`ServerIds::covered`].
    pub fn covered(&self, entry: &str) -> usize {
        self.lock().covered(entry)
    }

    /// See [`ServerIds::holds`].
    pub fn holds(&self, server_id: &str) -> bool {
        self.lock().holds(server_id)
    }

    /// A receiver that sees every change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

/// A tunnel's hold on its server id, released when dropped.
#[derive(Debug)]
pub struct Claim {
    registry: Arc<ServerRegistry>,
    server_id: Option<String>,
    leaving: bool,
}

impl Claim {
    /// The server asked the tunnel to leave (see [`ServerIds::leave`]).
    pub fn leave(&mut self) {
        if self.leaving {
            return;
        }
        self.leaving = true;
        if let Some(id) = &self.server_id {
            self.registry.lock().leave(id);
            self.registry.notify();
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Some(id) = self.server_id.take() {
            self.registry.lock().release(&id, self.leaving);
            self.registry.notify();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(s: &str) -> Arc<str> {
        s.into()
    }

    #[test]
    fn counts_are_at_least_one_and_capped() {
        assert_eq!(effective_count(0), 1);
        assert_eq!(effective_count(1), 1);
        assert_eq!(effective_count(3), 3);
        assert_eq!(effective_count(MAX_SERVER_COUNT + 1), MAX_SERVER_COUNT);
        assert_eq!(effective_count(u32::MAX), MAX_SERVER_COUNT);
    }

    #[test]
    fn with_a_count_of_one_every_address_keeps_exactly_one_tunnel() {
        assert!(needs_tunnel(1, 0, 0));
        assert!(!needs_tunnel(1, 1, 1));
        // Covered through another address: this one still wants its own.
        assert!(needs_tunnel(1, 0, 5));
    }

    #[test]
    fn with_a_larger_count_an_address_fills_until_the_entry_covers_it() {
        // A load balancer: one address, two replicas.
        assert!(needs_tunnel(2, 1, 1));
        assert!(!needs_tunnel(2, 2, 2));
        // A headless name: the other address covers the second replica.
        assert!(!needs_tunnel(2, 1, 2));
        assert!(!needs_tunnel(2, 0, 2));
        // Never more own tunnels than the count, whatever is covered.
        assert!(!needs_tunnel(2, 2, 1));
    }

    #[test]
    fn a_second_tunnel_to_a_held_server_is_a_duplicate_when_the_count_is_larger() {
        let lb = entry("hub.example.com:443");
        let mut ids = ServerIds::default();
        assert_eq!(ids.admit(&lb, "server-a", 2), Ok(true));
        assert_eq!(
            ids.admit(&lb, "server-a", 2),
            Err(Duplicate {
                server_id: "server-a".into()
            })
        );
        assert_eq!(ids.covered(&lb), 1);
        assert_eq!(ids.admit(&lb, "server-b", 2), Ok(true));
        assert_eq!(ids.covered(&lb), 2);
    }

    #[test]
    fn with_a_count_of_one_nothing_is_refused() {
        let e = entry("localhost:8091");
        let mut ids = ServerIds::default();
        assert_eq!(ids.admit(&e, "server-a", 0), Ok(true));
        assert_eq!(ids.admit(&e, "server-a", 1), Ok(true));
        // The id stays held until both tunnels are gone.
        ids.release("server-a", false);
        assert!(ids.holds("server-a"));
        ids.release("server-a", false);
        assert!(!ids.holds("server-a"));
        assert_eq!(ids.covered(&e), 0);
    }

    #[test]
    fn a_server_without_an_id_is_admitted_without_being_held() {
        let e = entry("hub:443");
        let mut ids = ServerIds::default();
        assert_eq!(ids.admit(&e, "", 3), Ok(false));
        assert_eq!(ids.admit(&e, "", 3), Ok(false));
        assert_eq!(ids.covered(&e), 0);
    }

    #[test]
    fn server_ids_are_unique_across_entries_but_counted_per_entry() {
        let headless = entry("hub-headless:8091");
        let lb = entry("hub.example.com:443");
        let other_hub = entry("other-hub.example.com:443");
        let mut ids = ServerIds::default();
        assert_eq!(ids.admit(&headless, "a", 2), Ok(true));
        assert_eq!(ids.admit(&headless, "b", 2), Ok(true));
        // The load balancer reaches the same replicas: duplicates, but they
        // count as reached through it, so it needs nothing more.
        assert!(ids.admit(&lb, "a", 2).is_err());
        assert_eq!(ids.covered(&lb), 1);
        assert!(ids.admit(&lb, "b", 2).is_err());
        assert_eq!(ids.covered(&lb), 2);
        assert!(!needs_tunnel(2, 0, ids.covered(&lb)));
        // Another hub's replicas are its own.
        assert_eq!(ids.covered(&other_hub), 0);
        assert_eq!(ids.admit(&other_hub, "x", 2), Ok(true));
        assert_eq!(ids.covered(&other_hub), 1);
        assert_eq!(ids.covered(&headless), 2);
    }

    #[test]
    fn a_released_server_is_forgotten_and_can_be_filled_again() {
        let lb = entry("hub:443");
        let mut ids = ServerIds::default();
        assert_eq!(ids.admit(&lb, "a", 2), Ok(true));
        assert_eq!(ids.admit(&lb, "b", 2), Ok(true));
        ids.release("b", false);
        assert_eq!(ids.covered(&lb), 1);
        assert!(needs_tunnel(2, 1, ids.covered(&lb)));
        assert_eq!(ids.admit(&lb, "b", 2), Ok(true));
        // Releasing an id that is not held changes nothing.
        ids.release("nobody", false);
        assert_eq!(ids.covered(&lb), 2);
    }

    #[test]
    fn a_leaving_server_is_no_longer_covered_but_still_held() {
        let lb = entry("hub:443");
        let mut ids = ServerIds::default();
        assert_eq!(ids.admit(&lb, "a", 2), Ok(true));
        assert_eq!(ids.admit(&lb, "b", 2), Ok(true));
        ids.leave("a");
        // The address fills up again, and not with the server that is leaving.
        assert_eq!(ids.covered(&lb), 1);
        assert!(needs_tunnel(2, 1, ids.covered(&lb)));
        assert!(ids.admit(&lb, "a", 2).is_err());
        assert_eq!(ids.admit(&lb, "c", 2), Ok(true));
        assert_eq!(ids.covered(&lb), 2);
        ids.release("a", true);
        assert!(!ids.holds("a"));
        assert_eq!(ids.covered(&lb), 2);
    }

    #[tokio::test]
    async fn a_claim_releases_its_server_when_dropped_and_says_so() {
        let registry = Arc::new(ServerRegistry::default());
        let mut changes = registry.subscribe();
        let lb = entry("hub:443");
        let claim = registry.admit(&lb, "a", 2).expect("first tunnel");
        assert!(changes.has_changed().unwrap());
        changes.mark_unchanged();
        let dup = registry.admit(&lb, "a", 2).unwrap_err();
        assert!(dup.to_string().contains("\"a\""), "{dup}");
        assert!(registry.holds("a"));
        drop(claim);
        assert!(changes.has_changed().unwrap());
        assert!(!registry.holds("a"));
        assert_eq!(registry.covered(&lb), 0);
        assert!(registry.admit(&lb, "a", 2).is_ok());
    }
}
