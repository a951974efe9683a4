//! Picking an agent of a connection's cluster and opening the connection on
//! its tunnel: the cheaper of two agents, a retry on another while the agent
//! did not act on the open (so no destination is dialed twice), the agents'
//! connection leases. Used by every client front end ([`crate::connection`])
//! and by the server's own probes ([`crate::probes`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tunnel_proto::error::{ErrorCode, TunnelError};
use tunnel_proto::relay::TunnelStream;
use tunnel_proto::stream::{Open, OpenFailure, Opened};

use crate::pool::{AgentPool, AgentTunnel, Pick};

/// Extra time the server waits beyond the dial timeout it gave the agent.
pub(crate) const AGENT_ANSWER_MARGIN: Duration = Duration::from_secs(2);

/// A connection counted against its agent from the moment the agent is
/// picked (so that an agent that hangs does not look idle) until dropped.
pub(crate) struct AgentLease(pub(crate) Arc<AgentTunnel>);

impl AgentLease {
    /// Counts one more connection on `agent`, unless it carries `max` already.
    fn try_new(agent: Arc<AgentTunnel>, max: u64) -> Option<Self> {
        agent
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        Some(Self(agent))
    }
}

impl Drop for AgentLease {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What [`route`] hands back: the agent's answer, the agent-side stream and
/// the lease on the agent.
pub(crate) type Routed = (Opened, TunnelStream, AgentLease);

fn tunnel_broken(agent: &AgentTunnel, err: &h2::Error) -> TunnelError {
    TunnelError::new(
        ErrorCode::TunnelBroken,
        format!("tunnel to agent {} failed: {err}", agent.agent_id),
    )
}

/// How [`route`] treats agents.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RouteLimits {
    /// Connections one agent may carry.
    pub max_per_agent: u64,
    /// Time an agent that acknowledges opens has to do so.
    pub ack_timeout: Duration,
}

/// How one attempt on one agent failed.
struct AttemptFailed {
    err: TunnelError,
    /// The agent did not act on the open: another agent may get it.
    elsewhere: bool,
    /// The agent itself failed (not the destination): it is passed over.
    agent_failed: bool,
}

/// Opens `open` as a stream on `agent`'s tunnel and reads the answer; an
/// agent that acknowledges opens has `ack_timeout` to do so (extended while
/// its tunnel keeps receiving data), or as long as it needs without one (the
/// last agent that could take the open: no other to retry on).
async fn open_on(
    agent: &AgentTunnel,
    open: &Open,
    ack_timeout: Option<Duration>,
) -> Result<(Opened, TunnelStream), AttemptFailed> {
    let request = open.to_request(None).map_err(|err| AttemptFailed {
        err,
        elsewhere: false,
        agent_failed: false,
    })?;
    let mut pending = agent.start_open();
    let mut acked = false;
    let result = if agent.acknowledges_opens {
        // The answer time is taken at the acknowledgement, before the agent
        // dials: the destination's dial is no part of it.
        let on_ack = || {
            acked = true;
            pending.answered();
        };
        tunnel_proto::stream::open_acknowledged(&agent.channel, request, ack_timeout, on_ack).await
    } else {
        tunnel_proto::stream::open_on(&agent.channel, request).await
    };
    if matches!(result, Ok(_) | Err(OpenFailure::Refused(_))) {
        pending.answered();
    }
    let failure = match result {
        Ok(opened) => return Ok(opened),
        Err(f) => f,
    };
    // Not acted on by the agent: refused by its connection, or never
    // acknowledged (the agent checks for the reset before it dials). A
    // tunnel that broke before the acknowledgement counts too: had the agent
    // begun to dial, that dial ends with the tunnel, before any byte of the
    // connection was sent.
    let elsewhere = failure.was_not_processed()
        || (agent.acknowledges_opens && !acked && !matches!(failure, OpenFailure::Refused(_)));
    let (err, agent_failed) = match failure {
        OpenFailure::Full(e) => (
            TunnelError::new(
                ErrorCode::ResourceExhausted,
                format!("the tunnel to agent {}: {e}", agent.agent_id),
            ),
            false,
        ),
        OpenFailure::Connection(e) | OpenFailure::Answer(e) => (tunnel_broken(agent, &e), true),
        OpenFailure::NotAcknowledged(t) => (
            TunnelError::new(
                ErrorCode::TunnelBroken,
                format!(
                    "agent {} did not acknowledge the open within {t:?}",
                    agent.agent_id
                ),
            ),
            true,
        ),
        OpenFailure::Refused(err) => (err, false),
    };
    if agent_failed {
        let passed_over = pending.failed();
        tracing::warn!(id = %open.id, agent = %agent.agent_id, cluster = %open.cluster, %err, ?passed_over, "agent failed an open; passed over while others are usable");
    }
    Err(AttemptFailed {
        err,
        elsewhere,
        agent_failed,
    })
}

/// Opens the connection `open` on an agent of its cluster, trying others
/// while the agent did not act on it (so no destination is dialed twice).
/// `on_pick` is told each agent tried. Used for clients' connections and the
/// server's own probes ([`crate::probes`]); counts nothing but the agents'
/// leases. When every agent was tried and none acted on the open, the answer
/// is `no_agent`: the client may try another server.
pub(crate) async fn route(
    pool: &AgentPool,
    open: &Open,
    limits: RouteLimits,
    mut on_pick: impl FnMut(&AgentTunnel),
) -> Result<Routed, TunnelError> {
    let mut tried: Vec<Arc<AgentTunnel>> = Vec::new();
    let mut last_err: Option<TunnelError> = None;
    // Every agent tried so far carried its maximum.
    let mut all_full = true;
    let max_per_agent = limits.max_per_agent;
    loop {
        let agent = match pool.pick(&open.cluster, &tried) {
            Pick::Agent(a) => a,
            Pick::UnknownCluster => {
                return Err(TunnelError::new(
                    ErrorCode::UnknownCluster,
                    format!("cluster {:?} is not known to this server", open.cluster),
                ));
            }
            Pick::NoAgent if all_full && !tried.is_empty() => {
                return Err(match last_err {
                    Some(err) => err,
                    None => TunnelError::new(
                        ErrorCode::ResourceExhausted,
                        format!(
                            "every agent of cluster {:?} carries its maximum of {max_per_agent} connections (--max-connections-per-agent)",
                            open.cluster
                        ),
                    ),
                });
            }
            Pick::NoAgent => {
                return Err(match last_err {
                    Some(err) => TunnelError::new(
                        ErrorCode::NoAgent,
                        format!(
                            "no agent of cluster {:?} could take the connection; the last one: {}",
                            open.cluster, err.message
                        ),
                    ),
                    None => TunnelError::new(
                        ErrorCode::NoAgent,
                        format!("no agent of cluster {:?} is connected", open.cluster),
                    ),
                });
            }
        };
        tried.push(agent.clone());
        // A full agent is passed over for another one.
        let Some(lease) = AgentLease::try_new(agent.clone(), max_per_agent) else {
            continue;
        };
        on_pick(&agent);
        // The last agent that could take the open has no acknowledgement
        // deadline: with no other to retry on, a deadline could only turn a
        // slow (congested) agent's open into a failure.
        let ack_timeout = pool
            .has_untried(&open.cluster, &tried)
            .then_some(limits.ack_timeout);
        match open_on(&agent, open, ack_timeout).await {
            Ok((opened, stream)) => return Ok((opened, stream, lease)),
            Err(failed) if failed.elsewhere => {
                all_full &= failed.err.code == ErrorCode::ResourceExhausted;
                if !failed.agent_failed {
                    tracing::debug!(id = %open.id, agent = %agent.agent_id, err = %failed.err, "agent could not take the open; trying another");
                }
                last_err = Some(failed.err);
            }
            Err(failed) => return Err(failed.err),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use tunnel_proto::h2::H2Settings;
    use tunnel_proto::pb;
    use tunnel_proto::stream::opened_response;

    /// A fake agent of `east` on an in-memory tunnel, added to `pool`: it
    /// acknowledges each open after `ack_after` and answers it (opened)
    /// `dial` later, as an agent whose destination is slow to accept.
    async fn fake_agent(
        pool: &AgentPool,
        id: &str,
        ack_after: Duration,
        dial: Duration,
    ) -> Arc<AgentTunnel> {
        let (near, far) = tokio::io::duplex(1 << 16);
        let agent_id = id.to_owned();
        tokio::spawn(async move {
            let Ok(mut conn) = h2::server::handshake(far).await else {
                return;
            };
            while let Some(Ok((_req, mut respond))) = conn.accept().await {
                let agent_id = agent_id.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(ack_after).await;
                    let _ = respond.send_informational(tunnel_proto::stream::ack_response());
                    tokio::time::sleep(dial).await;
                    let opened = Opened {
                        agent_id,
                        peer: "127.0.0.1:1".into(),
                    };
                    let send = respond.send_response(opened_response(&opened), false);
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    drop(send);
                });
            }
        });
        let (channel, driver) = tunnel_proto::h2::client_handshake(near, &H2Settings::default())
            .await
            .expect("in-memory HTTP/2");
        tokio::spawn(driver);
        let tunnel = Arc::new(AgentTunnel::new(
            id.into(),
            "east".into(),
            "127.0.0.1:1".parse().expect("address"),
            channel,
            true,
        ));
        pool.add(tunnel.clone());
        tunnel
    }

    fn info(pool: &AgentPool, id: &str) -> pb::AgentInfo {
        pool.snapshot()
            .into_iter()
            .flat_map(|c| c.agents)
            .find(|a| a.agent_id == id)
            .expect("agent listed")
    }

    const LIMITS: RouteLimits = RouteLimits {
        max_per_agent: 100,
        ack_timeout: Duration::from_secs(5),
    };

    #[tokio::test]
    async fn a_slow_destination_is_no_part_of_the_agents_answer_time() {
        let pool = Arc::new(AgentPool::default());
        let dial = Duration::from_secs(2);
        fake_agent(&pool, "slow-dial", Duration::ZERO, dial).await;
        let p = pool.clone();
        let routed = tokio::spawn(async move {
            let open = Open::new("east", "10.0.0.1", 80);
            route(&p, &open, LIMITS, |_| {})
                .await
                .map(|(opened, _, _)| opened.agent_id)
        });
        // The acknowledgement arrives long before the destination answers.
        let waited = Instant::now();
        while info(&pool, "slow-dial").pending_opens > 0 {
            assert!(
                waited.elapsed() < dial,
                "the acknowledgement ends the pending open"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!routed.is_finished(), "the destination is still dialing");
        let during = info(&pool, "slow-dial").latency_us;
        assert_eq!(routed.await.expect("task").expect("opened"), "slow-dial");
        let after = info(&pool, "slow-dial").latency_us;
        // The dial took 2 s; the answer time is the acknowledgement's.
        for latency_us in [during, after] {
            assert!(
                latency_us < 500_000,
                "answer time {latency_us} µs includes the dial"
            );
        }
    }

    #[tokio::test]
    async fn a_full_agent_is_passed_over_for_another() {
        let pool = Arc::new(AgentPool::default());
        // One agent whose answer time is high (one slow acknowledgement) ...
        let slow = fake_agent(
            &pool,
            "slow-ack",
            Duration::from_millis(300),
            Duration::ZERO,
        )
        .await;
        let open = Open::new("east", "10.0.0.1", 80);
        let first = route(&pool, &open, LIMITS, |_| {}).await.expect("opened");
        drop(first);
        // ... and a quick one, cheaper but full.
        let quick = fake_agent(&pool, "quick", Duration::ZERO, Duration::ZERO).await;
        let limits = RouteLimits {
            max_per_agent: 1,
            ..LIMITS
        };
        let _full = AgentLease::try_new(quick, 1).expect("the only connection");
        for _ in 0..3 {
            let open = Open::new("east", "10.0.0.1", 80);
            let mut picked = Vec::new();
            let (opened, _, _) = route(&pool, &open, limits, |a| picked.push(a.agent_id.clone()))
                .await
                .expect("the other agent takes it");
            assert_eq!(opened.agent_id, "slow-ack", "picked {picked:?}");
        }
        // Every agent full: resource_exhausted.
        let _full2 = AgentLease::try_new(slow, 1).expect("its only connection");
        let open = Open::new("east", "10.0.0.1", 80);
        let err = route(&pool, &open, limits, |_| {})
            .await
            .err()
            .expect("every agent full");
        assert_eq!(err.code, ErrorCode::ResourceExhausted, "{err}");
    }
}
