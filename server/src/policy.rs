//! Authorization: which subjects may reach which clusters and destinations.
//!
//! One schema, two homes: the `TunnelPolicy` custom resource
//! ([`tunnel_api::policy`]) and, standalone, a YAML file whose top level is
//! the same `spec` ([`TunnelPolicySpec`]). Both
//! compile into a [`Policy`], which the server consults when a connection
//! opens. Deny unless a rule allows.
//!
//! Cluster-scoped because a policy grants access to *other* clusters: a
//! namespaced policy would let whoever can write in a namespace grant its own
//! workloads access. Only the hub's administrators write policies.
//!
//! Clusters are selected by name, by labels (`matchLabels`) or by
//! open-cluster-management `ManagedClusterSet` (`clusterSet`). Labels come
//! from the server's `--cluster-label` flags and, with
//! `--clusters-from-ocm`, from the `ManagedCluster`s themselves, as
//! Placements see them; set membership from the `ManagedClusterSet`s (see
//! [`ClusterInventory`]). The CRD validates what it can before an object is
//! stored (CEL rules: one kind of subject, cluster selector and destination
//! each; ports in range; at least one rule, subject and cluster), and the
//! server reports each object's `Accepted` condition.
//!
//! Here: compiling a spec and deciding an access. Reading and watching a
//! policy file is `policy/file.rs`'s; parsing `--cluster-label` is
//! `policy/cluster_label.rs`'s.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use tunnel_api::policy::{ClusterSelector, DestinationSelector, SubjectSelector, TunnelPolicySpec};
use tunnel_identity::spiffe::{self as identity, Identity};

mod cluster_label;
mod file;

pub use cluster_label::{ClusterLabel, ClusterLabelError, parse_cluster_label};
pub use file::{ReloadResult, load_policy_file, watch_policy_file};

/// How often a policy file is checked for changes.
pub const DEFAULT_POLICY_RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// Why a policy could not be used; the message starts with the field's path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The file could not be read.
    #[error("cannot read policy file {path}: {reason}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        reason: String,
    },
    /// The document does not fit the schema (unknown field, wrong type, ...).
    #[error("{source_name}: {reason}")]
    Parse {
        /// The file or object.
        source_name: String,
        /// The parser's message, which names the field (e.g. `rules[0].subjects[0]: unknown field ...`).
        reason: String,
    },
    /// A field's value is invalid.
    #[error("{source_name}: {field}: {reason}")]
    Invalid {
        /// The file or object.
        source_name: String,
        /// Path of the field, e.g. `rules[1].destinations[0].cidr`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// One connection as the policy sees it.
#[derive(Debug, Clone, Copy)]
pub struct Access<'a> {
    /// Who asks.
    pub subject: &'a Identity,
    /// The cluster asked for.
    pub cluster: &'a str,
    /// Its labels.
    pub cluster_labels: &'a BTreeMap<String, String>,
    /// Destination host (a name or an IP literal).
    pub host: &'a str,
    /// Destination port.
    pub port: u16,
}

/// The outcome of [`Policy::decide`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Allowed by `rule`.
    Allow {
        /// The first rule that allowed it (`<source>/<rule>`).
        rule: String,
    },
    /// No rule allowed it.
    Deny,
}

impl Decision {
    /// Whether access is allowed.
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow { .. })
    }

    /// The deciding rule, or `default-deny`.
    pub fn rule(&self) -> &str {
        match self {
            Decision::Allow { rule } => rule,
            Decision::Deny => "default-deny",
        }
    }
}

#[derive(Debug, Clone)]
enum SubjectMatch {
    ServiceAccount { namespace: String, name: String },
    Namespace(String),
    Identity(Identity),
}

#[derive(Debug, Clone)]
enum ClusterMatch {
    Any,
    Name(String),
    Labels(BTreeMap<String, String>),
    Set(String),
}

/// What the hub knows of its clusters besides their names: the labels of
/// each `ManagedCluster` and the `ManagedClusterSet`s each belongs to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterInventory {
    /// Labels by cluster.
    pub labels: BTreeMap<String, BTreeMap<String, String>>,
    /// Cluster sets by cluster.
    pub sets: BTreeMap<String, std::collections::BTreeSet<String>>,
}

#[derive(Debug, Clone)]
enum HostMatch {
    Any,
    Exact(String),
    /// `*.example.svc`: stored as `.example.svc`.
    Suffix(String),
    Net(IpNet),
}

#[derive(Debug, Clone)]
struct DestinationMatch {
    host: HostMatch,
    /// Inclusive ranges; empty = any port.
    ports: Vec<(u16, u16)>,
}

#[derive(Debug, Clone)]
struct Rule {
    id: String,
    subjects: Vec<SubjectMatch>,
    clusters: Vec<ClusterMatch>,
    destinations: Vec<DestinationMatch>,
}

/// Compiled rules from every source, ready to decide.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    rules: Vec<Rule>,
    inventory: Arc<ClusterInventory>,
}

impl Policy {
    /// A policy that allows nothing.
    pub fn deny_all() -> Self {
        Self::default()
    }

    /// Compiles `spec`, naming its rules `<source_name>/<rule name or index>`.
    pub fn compile(source_name: &str, spec: &TunnelPolicySpec) -> Result<Self, PolicyError> {
        let mut policy = Policy::default();
        policy.add(source_name, spec)?;
        Ok(policy)
    }

    /// Adds the rules of another source.
    pub fn add(&mut self, source_name: &str, spec: &TunnelPolicySpec) -> Result<(), PolicyError> {
        let invalid = |field: String, reason: String| PolicyError::Invalid {
            source_name: source_name.to_owned(),
            field,
            reason,
        };
        for (i, rule) in spec.rules.iter().enumerate() {
            let at = format!("rules[{i}]");
            if rule.subjects.is_empty() {
                return Err(invalid(
                    format!("{at}.subjects"),
                    "at least one subject is required".into(),
                ));
            }
            if rule.clusters.is_empty() {
                return Err(invalid(
                    format!("{at}.clusters"),
                    "at least one cluster selector is required".into(),
                ));
            }
            let subjects = rule
                .subjects
                .iter()
                .enumerate()
                .map(|(j, s)| {
                    compile_subject(s)
                        .map_err(|(f, r)| invalid(format!("{at}.subjects[{j}]{f}"), r))
                })
                .collect::<Result<_, _>>()?;
            let clusters = rule
                .clusters
                .iter()
                .enumerate()
                .map(|(j, c)| {
                    compile_cluster(c)
                        .map_err(|(f, r)| invalid(format!("{at}.clusters[{j}]{f}"), r))
                })
                .collect::<Result<_, _>>()?;
            let destinations = rule
                .destinations
                .iter()
                .enumerate()
                .map(|(j, d)| {
                    compile_destination(d)
                        .map_err(|(f, r)| invalid(format!("{at}.destinations[{j}]{f}"), r))
                })
                .collect::<Result<_, _>>()?;
            let name = rule.name.clone().unwrap_or_else(|| format!("rules[{i}]"));
            self.rules.push(Rule {
                id: format!("{source_name}/{name}"),
                subjects,
                clusters,
                destinations,
            });
        }
        Ok(())
    }

    /// Appends the rules of `other` (after ours: earlier rules decide first).
    pub fn extend(&mut self, other: &Policy) {
        self.rules.extend(other.rules.iter().cloned());
    }

    /// Decides with the clusters' labels and sets from `inventory` too (a
    /// label the server's flags give wins over the cluster's own).
    pub fn with_inventory(mut self, inventory: Arc<ClusterInventory>) -> Self {
        self.inventory = inventory;
        self
    }

    /// Number of rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether there are no rules (everything is denied).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The first rule that allows `access`, or deny.
    pub fn decide(&self, access: &Access<'_>) -> Decision {
        let host = access.host.trim_end_matches('.').to_ascii_lowercase();
        let ip: Option<IpAddr> = host.parse().ok();
        let merged;
        let labels = match self.inventory.labels.get(access.cluster) {
            Some(own) => {
                let mut all = own.clone();
                all.extend(
                    access
                        .cluster_labels
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone())),
                );
                merged = all;
                &merged
            }
            None => access.cluster_labels,
        };
        let no_sets = std::collections::BTreeSet::new();
        let sets = self.inventory.sets.get(access.cluster).unwrap_or(&no_sets);
        for rule in &self.rules {
            if rule
                .subjects
                .iter()
                .any(|s| subject_matches(s, access.subject))
                && rule
                    .clusters
                    .iter()
                    .any(|c| cluster_matches(c, access.cluster, labels, sets))
                && (rule.destinations.is_empty()
                    || rule
                        .destinations
                        .iter()
                        .any(|d| destination_matches(d, &host, ip, access.port)))
            {
                return Decision::Allow {
                    rule: rule.id.clone(),
                };
            }
        }
        Decision::Deny
    }
}

type FieldError = (String, String);

fn exactly_one(set: &[(&str, bool)]) -> Result<(), FieldError> {
    let n = set.iter().filter(|(_, on)| *on).count();
    if n == 1 {
        return Ok(());
    }
    let names: Vec<&str> = set.iter().map(|(n, _)| *n).collect();
    Err((
        String::new(),
        format!("exactly one of {} must be set, found {n}", names.join(", ")),
    ))
}

fn compile_subject(s: &SubjectSelector) -> Result<SubjectMatch, FieldError> {
    exactly_one(&[
        ("serviceAccount", s.service_account.is_some()),
        ("namespace", s.namespace.is_some()),
        ("identity", s.identity.is_some()),
    ])?;
    if let Some(sa) = &s.service_account {
        return match identity::parse_workload(sa) {
            Ok(Identity::Workload {
                namespace,
                service_account,
            }) => Ok(SubjectMatch::ServiceAccount {
                namespace,
                name: service_account,
            }),
            Ok(_) => unreachable!("parse_workload returns workloads"),
            Err(e) => Err((".serviceAccount".into(), e.to_string())),
        };
    }
    if let Some(ns) = &s.namespace {
        identity::validate_namespace(ns).map_err(|e| (".namespace".into(), e.to_string()))?;
        return Ok(SubjectMatch::Namespace(ns.clone()));
    }
    let id = s.identity.as_deref().unwrap_or_default();
    let parsed = identity::parse_identity_uri(&format!("spiffe://td/{id}"), "td").map_err(|e| {
        (
            ".identity".to_owned(),
            e.to_string().replace("spiffe://td/", ""),
        )
    })?;
    if !parsed.is_caller() {
        return Err((
            ".identity".into(),
            format!("{id:?} is not a client or workload identity"),
        ));
    }
    Ok(SubjectMatch::Identity(parsed))
}

fn compile_cluster(c: &ClusterSelector) -> Result<ClusterMatch, FieldError> {
    exactly_one(&[
        ("name", c.name.is_some()),
        ("matchLabels", c.match_labels.is_some()),
        ("clusterSet", c.cluster_set.is_some()),
    ])?;
    match (&c.name, &c.match_labels, &c.cluster_set) {
        (Some(n), _, _) if n == "*" => Ok(ClusterMatch::Any),
        (Some(n), _, _) => {
            identity::validate_cluster_name(n).map_err(|e| (".name".into(), e.to_string()))?;
            Ok(ClusterMatch::Name(n.clone()))
        }
        (None, Some(labels), _) => {
            if labels.is_empty() {
                return Err((
                    ".matchLabels".into(),
                    "must name at least one label (use name: \"*\" for every cluster)".into(),
                ));
            }
            Ok(ClusterMatch::Labels(labels.clone()))
        }
        (None, None, Some(set)) => {
            if set.is_empty() {
                return Err((".clusterSet".into(), "must name a ManagedClusterSet".into()));
            }
            Ok(ClusterMatch::Set(set.clone()))
        }
        (None, None, None) => unreachable!("checked by exactly_one"),
    }
}

fn compile_destination(d: &DestinationSelector) -> Result<DestinationMatch, FieldError> {
    exactly_one(&[("host", d.host.is_some()), ("cidr", d.cidr.is_some())])?;
    let host = match (&d.host, &d.cidr) {
        (Some(h), _) => {
            let h = h.trim_end_matches('.').to_ascii_lowercase();
            if h == "*" {
                HostMatch::Any
            } else if let Some(rest) = h.strip_prefix("*.") {
                if rest.is_empty() || rest.contains('*') {
                    return Err((".host".into(), format!("invalid wildcard {h:?}")));
                }
                HostMatch::Suffix(format!(".{rest}"))
            } else if h.is_empty() || h.contains('*') || h.chars().any(char::is_whitespace) {
                return Err((
                    ".host".into(),
                    format!("{h:?} is not a host name, *.<suffix> or *"),
                ));
            } else {
                HostMatch::Exact(h)
            }
        }
        (None, Some(c)) => {
            let net = c
                .parse::<IpNet>()
                .or_else(|_| c.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    (
                        ".cidr".to_owned(),
                        format!("{c:?} is not an IP network or address"),
                    )
                })?;
            HostMatch::Net(net.trunc())
        }
        (None, None) => unreachable!("checked by exactly_one"),
    };
    let mut ports = Vec::new();
    for (k, p) in d.ports.iter().enumerate() {
        if *p == 0 {
            return Err((format!(".ports[{k}]"), "port 0 is not a port".into()));
        }
        ports.push((*p, *p));
    }
    for (k, r) in d.port_ranges.iter().enumerate() {
        let parsed = r.split_once('-').and_then(|(a, b)| {
            Some((a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?))
        });
        match parsed {
            Some((a, b)) if a > 0 && a <= b => ports.push((a, b)),
            _ => {
                return Err((
                    format!(".portRanges[{k}]"),
                    format!("{r:?} is not FROM-TO with 1 <= FROM <= TO <= 65535"),
                ));
            }
        }
    }
    Ok(DestinationMatch { host, ports })
}

fn subject_matches(m: &SubjectMatch, subject: &Identity) -> bool {
    match (m, subject) {
        (
            SubjectMatch::ServiceAccount { namespace, name },
            Identity::Workload {
                namespace: ns,
                service_account,
            },
        ) => namespace == ns && name == service_account,
        (SubjectMatch::Namespace(ns), Identity::Workload { namespace, .. }) => ns == namespace,
        (SubjectMatch::Identity(id), subject) => id == subject,
        _ => false,
    }
}

fn cluster_matches(
    m: &ClusterMatch,
    cluster: &str,
    labels: &BTreeMap<String, String>,
    sets: &std::collections::BTreeSet<String>,
) -> bool {
    match m {
        ClusterMatch::Any => true,
        ClusterMatch::Name(n) => n == cluster,
        ClusterMatch::Labels(want) => want.iter().all(|(k, v)| labels.get(k) == Some(v)),
        ClusterMatch::Set(set) => sets.contains(set),
    }
}

fn destination_matches(d: &DestinationMatch, host: &str, ip: Option<IpAddr>, port: u16) -> bool {
    let host_ok = match &d.host {
        HostMatch::Any => true,
        HostMatch::Exact(h) => h == host,
        HostMatch::Suffix(s) => host.ends_with(s.as_str()),
        HostMatch::Net(net) => ip.is_some_and(|ip| net.contains(&ip)),
    };
    host_ok && (d.ports.is_empty() || d.ports.iter().any(|(a, b)| (*a..=*b).contains(&port)))
}

/// Parses a policy file's text (YAML; JSON is YAML too).
pub fn parse_policy_text(source_name: &str, text: &str) -> Result<Policy, PolicyError> {
    let spec: TunnelPolicySpec = serde_yaml::from_str(text).map_err(|e| PolicyError::Parse {
        source_name: source_name.to_owned(),
        reason: e.to_string(),
    })?;
    Policy::compile(source_name, &spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
rules:
  - name: payments-to-east
    subjects:
      - serviceAccount: team-a/payments
      - identity: client/ci
    clusters:
      - name: east
    destinations:
      - host: "*.svc"
        ports: [443, 8080]
      - cidr: 10.0.0.0/8
        portRanges: ["8000-8999"]
  - name: monitoring-everywhere-prod
    subjects:
      - namespace: monitoring
    clusters:
      - matchLabels: { env: prod }
"#;

    fn wl(ns: &str, sa: &str) -> Identity {
        Identity::Workload {
            namespace: ns.into(),
            service_account: sa.into(),
        }
    }

    fn decide(p: &Policy, who: &Identity, cluster: &str, host: &str, port: u16) -> Decision {
        let mut labels = BTreeMap::new();
        if cluster == "west" {
            labels.insert("env".to_string(), "prod".to_string());
        }
        p.decide(&Access {
            subject: who,
            cluster,
            cluster_labels: &labels,
            host,
            port,
        })
    }

    #[test]
    fn rules_allow_and_default_denies() {
        let p = parse_policy_text("policy.yaml", SAMPLE).unwrap();
        let pay = wl("team-a", "payments");
        assert_eq!(
            decide(&p, &pay, "east", "hello.default.svc", 8080).rule(),
            "policy.yaml/payments-to-east"
        );
        assert_eq!(
            decide(&p, &pay, "east", "HELLO.default.svc.", 443).rule(),
            "policy.yaml/payments-to-east"
        );
        assert_eq!(
            decide(&p, &pay, "east", "hello.default.svc", 22),
            Decision::Deny
        );
        assert_eq!(
            decide(&p, &pay, "west", "hello.default.svc", 443),
            Decision::Deny
        );
        assert!(decide(&p, &pay, "east", "10.1.2.3", 8500).is_allowed());
        assert!(!decide(&p, &pay, "east", "11.1.2.3", 8500).is_allowed());
        assert!(!decide(&p, &pay, "east", "example.com", 443).is_allowed());
        let ci = Identity::Client { name: "ci".into() };
        assert!(decide(&p, &ci, "east", "a.svc", 443).is_allowed());
        let other = Identity::Client {
            name: "other".into(),
        };
        assert_eq!(
            decide(&p, &other, "east", "a.svc", 443).rule(),
            "default-deny"
        );
        let mon = wl("monitoring", "prometheus");
        assert_eq!(
            decide(&p, &mon, "west", "anything", 1).rule(),
            "policy.yaml/monitoring-everywhere-prod"
        );
        assert!(!decide(&p, &mon, "east", "anything", 1).is_allowed());
        assert!(!decide(&Policy::deny_all(), &pay, "east", "a.svc", 443).is_allowed());
    }

    #[test]
    fn malformed_policies_name_the_field() {
        let cases = [
            (
                "rules:\n  - subjects: [{serviceAcount: a/b}]\n    clusters: [{name: east}]\n",
                "rules[0].subjects[0]",
            ),
            (
                "rules:\n  - subjects: [{serviceAccount: a/b}]\n    clusters: [{name: east}]\n    destinations: [{cidr: 10.0.0.0/33}]\n",
                "rules[0].destinations[0].cidr",
            ),
            (
                "rules:\n  - subjects: [{namespace: a}]\n    clusters: [{name: East}]\n",
                "rules[0].clusters[0].name",
            ),
            (
                "rules:\n  - subjects: [{namespace: a, identity: client/x}]\n    clusters: [{name: e}]\n",
                "rules[0].subjects[0]",
            ),
            (
                "rules:\n  - subjects: [{namespace: a}]\n    clusters: [{name: e}]\n  - subjects: [{identity: server}]\n    clusters: [{name: e}]\n",
                "rules[1].subjects[0].identity",
            ),
            (
                "rules:\n  - subjects: [{namespace: a}]\n    clusters: [{name: e}]\n    destinations: [{host: a, portRanges: [\"9-1\"]}]\n",
                "rules[0].destinations[0].portRanges[0]",
            ),
            (
                "rules:\n  - subjects: [{namespace: a}]\n    clusters: [{name: e}]\n    destinations: [{host: a, ports: [70000]}]\n",
                "rules[0].destinations[0].ports[0]",
            ),
            (
                "rules:\n  - subjects: []\n    clusters: [{name: e}]\n",
                "rules[0].subjects",
            ),
        ];
        for (text, field) in cases {
            let err = parse_policy_text("p.yaml", text).unwrap_err().to_string();
            assert!(err.contains(field), "{field} not named in {err:?}");
        }
    }

    #[test]
    fn a_cluster_selector_is_one_of_name_labels_or_cluster_set() {
        let err = parse_policy_text(
            "p",
            "rules:\n  - subjects: [{namespace: a}]\n    clusters: [{name: east, clusterSet: prod}]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("rules[0].clusters[0]: exactly one of name, matchLabels, clusterSet"),
            "{err}"
        );
        let p = parse_policy_text(
            "p",
            "rules:\n  - subjects: [{namespace: a}]\n    clusters: [{clusterSet: prod}]\n",
        )
        .unwrap();
        // Without an inventory no cluster is in any set.
        assert!(!decide(&p, &wl("a", "x"), "east", "svc", 1).is_allowed());
        let inventory = ClusterInventory {
            sets: BTreeMap::from([(
                "east".to_string(),
                std::collections::BTreeSet::from(["prod".to_string()]),
            )]),
            ..Default::default()
        };
        let p = p.with_inventory(Arc::new(inventory));
        assert!(decide(&p, &wl("a", "x"), "east", "svc", 1).is_allowed());
        assert!(!decide(&p, &wl("a", "x"), "west", "svc", 1).is_allowed());
    }

    #[test]
    fn a_clusters_own_labels_count_and_the_servers_flags_win() {
        let p = parse_policy_text(
            "p",
            "rules:\n  - subjects: [{namespace: a}]\n    clusters: [{matchLabels: {env: prod}}]\n",
        )
        .unwrap()
        .with_inventory(Arc::new(ClusterInventory {
            labels: BTreeMap::from([
                (
                    "east".to_string(),
                    BTreeMap::from([("env".to_string(), "prod".to_string())]),
                ),
                // west calls itself prod, but the server's flag says dev.
                (
                    "west".to_string(),
                    BTreeMap::from([("env".to_string(), "prod".to_string())]),
                ),
            ]),
            ..Default::default()
        }));
        let who = wl("a", "x");
        let flags = BTreeMap::from([("env".to_string(), "dev".to_string())]);
        let at = |cluster: &str, labels: &BTreeMap<String, String>| {
            p.decide(&Access {
                subject: &who,
                cluster,
                cluster_labels: labels,
                host: "svc",
                port: 1,
            })
            .is_allowed()
        };
        assert!(at("east", &BTreeMap::new()));
        assert!(!at("west", &flags));
    }
}
