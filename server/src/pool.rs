//! The agents connected to this server, by cluster, and how a connection
//! picks one.
//!
//! The pick is the power of two choices over a load estimate, the way
//! linkerd2-proxy balances endpoints (p2c over peak-EWMA): two usable agents
//! are drawn at random and the one with the lower cost wins, where
//!
//! > cost = (connections counted against the agent + 1) x its answer time
//!
//! - The count includes opens still waiting for the agent's answer: an agent
//!   is charged from the moment it is picked, so one that hangs does not
//!   look idle.
//! - The answer time is a peak-sensitive moving average of how long the
//!   agent takes to acknowledge an open (to answer it, for agents that do
//!   not acknowledge), taken when the acknowledgement arrives, so the
//!   destination's dial that follows is no part of it: a slow answer raises
//!   it at once, fast ones bring it down over [`LATENCY_DECAY`], and it decays
//!   with the time since it was last updated whenever it is read (as
//!   linkerd2-proxy's peak-EWMA does), so an agent that loses the draw
//!   after one slow answer does not keep its peak until it is picked again.
//!   While an agent has opens pending and has
//!   answered nothing for longer than that, the time it has been silent
//!   counts instead, so a frozen agent grows expensive within milliseconds,
//!   before any timeout. Below [`LATENCY_FLOOR`] differences are noise, and
//!   the cost is the connection count alone (least loaded).
//! - Failure accrual: an agent that failed an open (its tunnel broke under
//!   it, or it did not acknowledge in time) is *failing*: it is picked only
//!   when no other agent of the cluster is usable, until it answers again.
//!   Whether it does is checked with a control call (`Agent.Hello`, see
//!   [`crate::agents`]), not with a client's connection, after a backoff that
//!   doubles with each consecutive failure ([`FAILURE_BACKOFF_BASE`] up to
//!   [`FAILURE_BACKOFF_MAX`]); an answered open starts the count again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use rand::Rng as _;
use tunnel_proto::h2::H2Client;
use tunnel_proto::pb;

/// How fast the answer-time estimate forgets a slow answer.
pub const LATENCY_DECAY: Duration = Duration::from_secs(10);
/// Answer times below this are taken as equal.
pub const LATENCY_FLOOR: Duration = Duration::from_millis(1);
/// When a failing agent is first checked after its first consecutive failure.
pub const FAILURE_BACKOFF_BASE: Duration = Duration::from_secs(2);
/// The longest a failing agent waits for its next check.
pub const FAILURE_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// One agent's reverse tunnel to this server.
pub struct AgentTunnel {
    /// The agent's id (from its hello).
    pub agent_id: String,
    /// The cluster, from the agent's certificate.
    pub cluster: String,
    /// Where the agent connected from.
    pub remote_addr: std::net::SocketAddr,
    /// When the tunnel came up.
    pub since: SystemTime,
    /// Connections counted against this tunnel: open ones, and opens
    /// waiting for the agent's answer.
    pub open: AtomicU64,
    /// Opens stream towards the agent.
    pub channel: H2Client,
    /// Whether the agent acknowledges opens before it dials (its hello said so).
    pub acknowledges_opens: bool,
    /// Answer times and failures, as the pick sees them.
    health: Mutex<Health>,
    /// Milliseconds since the Unix epoch of the last pick (0: never).
    last_picked_ms: AtomicU64,
    /// Told when the agent fails: its check starts.
    pub(crate) failed: tokio::sync::Notify,
}

/// What the pick knows of an agent's answers.
#[derive(Debug)]
struct Health {
    /// Peak-EWMA of answer times, in seconds, as of `updated`.
    latency: f64,
    updated: Instant,
    /// Opens sent and not answered.
    pending: u64,
    /// When `pending` last rose from zero.
    pending_since: Instant,
    /// When the agent last answered anything.
    last_answer: Instant,
    consecutive_failures: u32,
    failing: bool,
}

impl Health {
    fn new(now: Instant) -> Self {
        Self {
            latency: LATENCY_FLOOR.as_secs_f64(),
            updated: now,
            pending: 0,
            pending_since: now,
            last_answer: now,
            consecutive_failures: 0,
            failing: false,
        }
    }

    /// The weight the estimate of `updated` keeps at `now`.
    fn kept(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        (-elapsed / LATENCY_DECAY.as_secs_f64()).exp()
    }

    /// The answer-time estimate now: the average decayed by the time since
    /// it was updated, or how long the agent has been silent with opens
    /// pending if that is longer.
    fn latency(&self, now: Instant) -> f64 {
        let silent = if self.pending > 0 {
            now.saturating_duration_since(self.pending_since.max(self.last_answer))
                .as_secs_f64()
        } else {
            0.0
        };
        (self.latency * self.kept(now))
            .max(silent)
            .max(LATENCY_FLOOR.as_secs_f64())
    }

    /// Counts an open sent at `now`.
    fn start(&mut self, now: Instant) {
        if self.pending == 0 {
            self.pending_since = now;
        }
        self.pending += 1;
    }

    /// An open sent at `started` was answered at `now`: no longer pending,
    /// and its answer time counts.
    fn answer(&mut self, started: Instant, now: Instant) {
        self.pending = self.pending.saturating_sub(1);
        self.observe(now.saturating_duration_since(started), now);
    }

    fn observe(&mut self, took: Duration, now: Instant) {
        let rtt = took.as_secs_f64();
        let kept = self.kept(now);
        if rtt > self.latency * kept {
            // Peak: a slow answer counts at once.
            self.latency = rtt;
        } else {
            // The average moves towards the answer over the time since it was
            // last updated.
            self.latency = self.latency * kept + rtt * (1.0 - kept);
        }
        self.updated = now;
        self.last_answer = now;
        self.consecutive_failures = 0;
        self.failing = false;
    }

    /// Counts a failure; returns the wait before the next check.
    fn fail(&mut self) -> Duration {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        self.failing = true;
        self.check_delay()
    }

    /// The wait before checking a failing agent: the backoff of its
    /// consecutive failures.
    fn check_delay(&self) -> Duration {
        let factor = 1u32
            .checked_shl(self.consecutive_failures.saturating_sub(1))
            .unwrap_or(u32::MAX);
        FAILURE_BACKOFF_BASE
            .saturating_mul(factor)
            .min(FAILURE_BACKOFF_MAX)
    }
}

/// An open sent to an agent and not answered yet, counted as pending until
/// answered, failed or dropped.
pub(crate) struct PendingOpen<'a> {
    agent: &'a AgentTunnel,
    started: Instant,
    /// Answered or failed: no longer pending.
    done: bool,
}

impl PendingOpen<'_> {
    /// The agent answered (acknowledged) the open: it is no longer pending
    /// and its answer time counts. Called when the acknowledgement arrives,
    /// before the agent dials the destination, so a slow destination does
    /// not make the agent look slow.
    pub(crate) fn answered(&mut self) {
        if !self.done {
            self.done = true;
            self.agent.health().answer(self.started, Instant::now());
        }
    }

    /// The open failed at the agent (tunnel broken, no acknowledgement in
    /// time); returns when the agent will be checked.
    pub(crate) fn failed(&mut self) -> Duration {
        let delay = {
            let mut h = self.agent.health();
            if !self.done {
                h.pending = h.pending.saturating_sub(1);
            }
            h.fail()
        };
        self.done = true;
        self.agent.failed.notify_one();
        delay
    }
}

impl Drop for PendingOpen<'_> {
    fn drop(&mut self) {
        if !self.done {
            let mut h = self.agent.health();
            h.pending = h.pending.saturating_sub(1);
        }
    }
}

impl AgentTunnel {
    /// A tunnel that just came up.
    pub fn new(
        agent_id: String,
        cluster: String,
        remote_addr: std::net::SocketAddr,
        channel: H2Client,
        acknowledges_opens: bool,
    ) -> Self {
        Self {
            agent_id,
            cluster,
            remote_addr,
            since: SystemTime::now(),
            open: AtomicU64::new(0),
            channel,
            acknowledges_opens,
            health: Mutex::new(Health::new(Instant::now())),
            last_picked_ms: AtomicU64::new(0),
            failed: tokio::sync::Notify::new(),
        }
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts an open sent to the agent until its answer.
    pub(crate) fn start_open(&self) -> PendingOpen<'_> {
        let now = Instant::now();
        self.health().start(now);
        let ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self.last_picked_ms.store(ms, Ordering::Relaxed);
        PendingOpen {
            agent: self,
            started: now,
            done: false,
        }
    }

    /// Whether the agent failed and has not answered since: it is passed
    /// over while others are usable.
    pub fn is_failing(&self) -> bool {
        self.health().failing
    }

    /// The wait before the next check of a failing agent.
    pub(crate) fn check_delay(&self) -> Duration {
        self.health().check_delay()
    }

    /// A check found the failing agent answering: it is picked again (its
    /// consecutive failures still count towards the next backoff).
    pub(crate) fn recovered(&self) {
        self.health().failing = false;
    }

    /// What `ListClusters` says of this agent.
    fn info(&self) -> pb::AgentInfo {
        let now = Instant::now();
        let (pending_opens, latency, failing) = {
            let h = self.health();
            (h.pending, h.latency(now), h.failing)
        };
        pb::AgentInfo {
            agent_id: self.agent_id.clone(),
            remote_addr: self.remote_addr.to_string(),
            connected_since: self
                .since
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            open_connections: self.open.load(Ordering::Relaxed),
            pending_opens,
            latency_us: u64::try_from(Duration::from_secs_f64(latency).as_micros())
                .unwrap_or(u64::MAX),
            last_picked_unix_ms: self.last_picked_ms.load(Ordering::Relaxed),
            failing,
        }
    }

    /// The pick's cost of one more connection on this agent.
    fn cost(&self, now: Instant) -> f64 {
        let load = self.open.load(Ordering::Relaxed) as f64 + 1.0;
        load * self.health().latency(now)
    }
}

impl std::fmt::Debug for AgentTunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentTunnel")
            .field("agent_id", &self.agent_id)
            .field("cluster", &self.cluster)
            .field("remote_addr", &self.remote_addr)
            .finish()
    }
}

/// What routing found for a cluster.
#[derive(Debug)]
pub enum Pick {
    /// Use this agent.
    Agent(Arc<AgentTunnel>),
    /// No agent of this cluster has ever connected, nor is it configured.
    UnknownCluster,
    /// The cluster is known but none of its agents is usable now.
    NoAgent,
}

impl Pick {
    /// Whether an agent was found.
    pub fn is_agent(&self) -> bool {
        matches!(self, Pick::Agent(_))
    }
}

/// Agents by cluster.
#[derive(Debug, Default)]
pub struct AgentPool {
    clusters: RwLock<HashMap<String, Vec<Arc<AgentTunnel>>>>,
    /// When the last tunnel was added.
    last_added: Mutex<Option<Instant>>,
}

impl AgentPool {
    /// A pool that knows `clusters` before any of their agents connects.
    pub fn with_known_clusters(clusters: &[String]) -> Self {
        let pool = Self::default();
        {
            let mut map = pool.clusters.write().unwrap_or_else(|e| e.into_inner());
            for c in clusters {
                map.entry(c.clone()).or_default();
            }
        }
        pool
    }

    /// When the last tunnel was added, if any was.
    pub fn last_added(&self) -> Option<Instant> {
        *self.last_added.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a tunnel; returns how many agents the cluster has now.
    pub fn add(&self, tunnel: Arc<AgentTunnel>) -> usize {
        *self.last_added.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        let mut map = self.clusters.write().unwrap_or_else(|e| e.into_inner());
        let agents = map.entry(tunnel.cluster.clone()).or_default();
        agents.push(tunnel);
        agents.len()
    }

    /// Removes a tunnel; the cluster stays known. Returns how many agents are left.
    pub fn remove(&self, tunnel: &Arc<AgentTunnel>) -> usize {
        let mut map = self.clusters.write().unwrap_or_else(|e| e.into_inner());
        let agents = map.entry(tunnel.cluster.clone()).or_default();
        agents.retain(|t| !Arc::ptr_eq(t, tunnel));
        agents.len()
    }

    /// Picks an agent of `cluster` for one more connection, skipping those
    /// in `tried` and closed tunnels: the cheaper of two drawn at random
    /// (see the module's documentation), from the agents that are not
    /// failing if there are any.
    pub fn pick(&self, cluster: &str, tried: &[Arc<AgentTunnel>]) -> Pick {
        let map = self.clusters.read().unwrap_or_else(|e| e.into_inner());
        let Some(agents) = map.get(cluster) else {
            return Pick::UnknownCluster;
        };
        let usable: Vec<&Arc<AgentTunnel>> = agents
            .iter()
            .filter(|a| !a.channel.is_closed() && !tried.iter().any(|t| Arc::ptr_eq(t, a)))
            .collect();
        let healthy: Vec<&Arc<AgentTunnel>> =
            usable.iter().copied().filter(|a| !a.is_failing()).collect();
        let from = if healthy.is_empty() {
            &usable
        } else {
            &healthy
        };
        match power_of_two_choices(from, Instant::now()) {
            Some(a) => Pick::Agent(a.clone()),
            None => Pick::NoAgent,
        }
    }

    /// Whether `cluster` has a usable agent (an open tunnel) that is not in
    /// `tried`.
    pub fn has_untried(&self, cluster: &str, tried: &[Arc<AgentTunnel>]) -> bool {
        let map = self.clusters.read().unwrap_or_else(|e| e.into_inner());
        map.get(cluster).is_some_and(|agents| {
            agents
                .iter()
                .any(|a| !a.channel.is_closed() && !tried.iter().any(|t| Arc::ptr_eq(t, a)))
        })
    }

    /// Every known cluster with its agents, sorted by name.
    pub fn snapshot(&self) -> Vec<pb::ClusterInfo> {
        let map = self.clusters.read().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<pb::ClusterInfo> = map
            .iter()
            .map(|(name, agents)| pb::ClusterInfo {
                name: name.clone(),
                agents: agents.iter().map(|a| a.info()).collect(),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Agents connected now, over all clusters.
    pub fn agent_count(&self) -> usize {
        let map = self.clusters.read().unwrap_or_else(|e| e.into_inner());
        map.values().map(Vec::len).sum()
    }
}

/// The cheaper of two distinct candidates drawn at random (the only one, if
/// there is one).
fn power_of_two_choices<'a>(
    candidates: &[&'a Arc<AgentTunnel>],
    now: Instant,
) -> Option<&'a Arc<AgentTunnel>> {
    match candidates.len() {
        0 => None,
        1 => Some(candidates[0]),
        n => {
            let mut rng = rand::rng();
            let i = rng.random_range(0..n);
            let j = (i + rng.random_range(1..n)) % n;
            let (a, b) = (candidates[i], candidates[j]);
            Some(if b.cost(now) < a.cost(now) { b } else { a })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_slow_answer_counts_at_once_and_fast_ones_bring_it_down() {
        let t0 = Instant::now();
        let mut h = Health::new(t0);
        h.observe(MS * 2, t0);
        assert!((h.latency(t0) - 0.002).abs() < 1e-9);
        h.observe(MS * 200, t0 + MS);
        assert!((h.latency(t0 + MS) - 0.2).abs() < 1e-9, "peak");
        // Fast answers over five decay periods bring it most of the way down.
        let mut t = t0 + MS;
        for _ in 0..100 {
            t += LATENCY_DECAY / 20;
            h.observe(MS * 2, t);
        }
        assert!(h.latency(t) < 0.004, "{}", h.latency(t));
    }

    #[test]
    fn a_stale_peak_decays_with_time_without_new_answers() {
        let t0 = Instant::now();
        let mut h = Health::new(t0);
        // One slow answer (a 10 s peak), then the agent loses every draw.
        h.start(t0);
        h.answer(t0, t0 + LATENCY_DECAY);
        let peak = h.latency(t0 + LATENCY_DECAY);
        assert!((peak - 10.0).abs() < 1e-6, "{peak}");
        let later = t0 + LATENCY_DECAY + LATENCY_DECAY * 5;
        assert!(
            h.latency(later) < peak * 0.01,
            "decayed by the time since: {}",
            h.latency(later)
        );
        // Long enough later it costs what an idle agent costs.
        let much_later = t0 + LATENCY_DECAY * 20;
        assert!((h.latency(much_later) - LATENCY_FLOOR.as_secs_f64()).abs() < 1e-9);
        // A new slow answer still counts at once.
        h.start(much_later);
        h.answer(much_later, much_later + MS * 300);
        assert!((h.latency(much_later + MS * 300) - 0.3).abs() < 1e-6);
    }

    #[test]
    fn an_acknowledged_open_is_no_longer_pending() {
        let t0 = Instant::now();
        let mut quick = Health::new(t0);
        let mut slow_dial = Health::new(t0);
        for h in [&mut quick, &mut slow_dial] {
            h.start(t0);
            h.answer(t0, t0 + MS);
        }
        // While the slow destination's dial runs (5 s), the agent that
        // acknowledged is not silent: it costs what the quick one does.
        let during = t0 + Duration::from_secs(5);
        assert_eq!(slow_dial.pending, 0);
        assert!((slow_dial.latency(during) - quick.latency(during)).abs() < 1e-12);
        assert!(slow_dial.latency(during) <= 0.001 + 1e-9);
    }

    #[test]
    fn an_agent_silent_with_opens_pending_grows_expensive() {
        let t0 = Instant::now();
        let mut h = Health::new(t0);
        h.observe(MS, t0);
        h.pending = 1;
        h.pending_since = t0 + MS;
        let later = t0 + MS * 51;
        assert!(
            (h.latency(later) - 0.05).abs() < 1e-6,
            "{}",
            h.latency(later)
        );
        // Nothing pending: silence is just idleness.
        h.pending = 0;
        assert!((h.latency(later) - 0.001).abs() < 1e-9);
    }

    #[test]
    fn consecutive_failures_back_off_the_checks_and_an_answer_ends_them() {
        let t0 = Instant::now();
        let mut h = Health::new(t0);
        assert!(!h.failing);
        assert_eq!(h.fail(), FAILURE_BACKOFF_BASE);
        assert!(h.failing);
        assert_eq!(h.fail(), FAILURE_BACKOFF_BASE * 2);
        for _ in 0..40 {
            h.fail();
        }
        assert_eq!(h.fail(), FAILURE_BACKOFF_MAX);
        h.observe(MS, t0);
        assert!(!h.failing);
        assert_eq!(
            h.fail(),
            FAILURE_BACKOFF_BASE,
            "counted from the start again"
        );
    }
}
