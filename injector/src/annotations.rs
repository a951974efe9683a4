//! The pod annotations that opt a pod in and tune its sidecar, and their
//! validation.
//!
//! Every key is under [`PREFIX`]. A value that does not parse refuses the pod
//! with an [`AnnotationError`] naming the annotation: the pod is not created and
//! whoever created it reads why (`kubectl` prints the message; a controller's
//! events show it). Ignoring a bad value would create a pod whose tunnel
//! silently differs from what its author wrote. Unknown keys under the prefix
//! are not errors (other components may add their own), but are reported back
//! as admission warnings, which `kubectl` prints, so a typo does not go unseen.

use std::collections::BTreeMap;

use tunnel_api::annotations::*;
use tunnel_api::sidecar::{DirectPolicy, PortMapping};
use tunnel_identity::spiffe::validate_cluster_name;

/// Longest log filter accepted in [`LOG_LEVEL`].
const MAX_LOG_LEVEL_LEN: usize = 256;

/// An annotation whose value cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("annotation {annotation}: {reason}")]
pub struct AnnotationError {
    /// The annotation's key.
    pub annotation: String,
    /// What is wrong and what would be right.
    pub reason: String,
}

impl AnnotationError {
    /// An error about `annotation`.
    pub fn new(annotation: &str, reason: impl Into<String>) -> Self {
        Self {
            annotation: annotation.to_owned(),
            reason: reason.into(),
        }
    }
}

/// How the sidecar is added to the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// First init container with `restartPolicy: Always` and a startup probe:
    /// started and ready before every other container, stopped after them,
    /// and it does not keep a Job's pod alive (Kubernetes 1.29 and later).
    Native,
    /// First app container with a `postStart` hook that waits for readiness,
    /// for clusters older than 1.29. Init containers run before it and cannot
    /// use the tunnel; a Job's pod must end it through `POST /shutdown`.
    Legacy,
}

impl Mode {
    /// The annotation value.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Native => "native",
            Mode::Legacy => "legacy",
        }
    }
}

/// What the pod's metadata says about injection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptIn {
    /// The pod asks for the sidecar.
    Yes,
    /// The pod does not; why (for the log).
    No(&'static str),
}

/// Reads the opt-in: the [`INJECT`] label set to `"false"` opts out whatever
/// the annotation says; the annotation set to `"true"` opts in.
pub fn opt_in(
    annotations: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> Result<OptIn, AnnotationError> {
    if labels
        .get(INJECT)
        .is_some_and(|v| v.eq_ignore_ascii_case("false"))
    {
        return Ok(OptIn::No("opted out by label"));
    }
    match annotations.get(INJECT) {
        None => Ok(OptIn::No("no inject annotation")),
        Some(value) => match parse_bool(INJECT, value)? {
            true => Ok(OptIn::Yes),
            false => Ok(OptIn::No("inject annotation is false")),
        },
    }
}

/// Defaults of the tunable settings, from the injector's flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Defaults {
    /// HTTP proxy port; `None` disables the proxy.
    pub proxy_port: Option<u16>,
    /// Whether to set the proxy environment variables.
    pub set_proxy_env: bool,
    /// Sidecar resources.
    pub resources: Resources,
    /// Sidecar log filter.
    pub log_level: String,
    /// Injection mode.
    pub mode: Mode,
}

/// Requests and limits of the sidecar, as Kubernetes quantities.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resources {
    /// CPU request.
    pub cpu_request: Option<String>,
    /// Memory request.
    pub memory_request: Option<String>,
    /// CPU limit.
    pub cpu_limit: Option<String>,
    /// Memory limit.
    pub memory_limit: Option<String>,
}

/// The injector's flag that chooses the sidecar's admin port.
pub const ADMIN_PORT_FLAG: &str = "--sidecar-admin-port";

/// A loopback port the sidecar listens on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListeningPort {
    /// The port.
    pub port: u16,
    /// The annotation (or the injector's flag) that chose it: what to
    /// change when it clashes.
    pub chosen_by: &'static str,
}

impl ListeningPort {
    /// `port`, chosen by `chosen_by`.
    pub fn new(port: u16, chosen_by: &'static str) -> Self {
        Self { port, chosen_by }
    }
}

/// The settings of one pod's sidecar: the defaults, overridden by annotations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodOptions {
    /// Per-cluster loopback ports, as written (trimmed) and parsed.
    pub ports: Vec<(String, PortMapping)>,
    /// HTTP proxy port; `None` when disabled.
    pub proxy_port: Option<u16>,
    /// Whether to set `HTTP_PROXY` and friends in the app's containers.
    pub set_proxy_env: bool,
    /// The sidecar's default cluster.
    pub default_cluster: Option<String>,
    /// Whether the proxy dials destinations outside the clusters.
    pub direct: DirectPolicy,
    /// Sidecar resources.
    pub resources: Resources,
    /// Sidecar log filter.
    pub log_level: String,
    /// Injection mode.
    pub mode: Mode,
    /// Annotations under the prefix that the injector does not know.
    pub unknown: Vec<String>,
}

impl PodOptions {
    /// Reads the options of an opted-in pod. `admin_port` is the sidecar's
    /// admin port, which no other port may use.
    pub fn from_annotations(
        annotations: &BTreeMap<String, String>,
        defaults: &Defaults,
        admin_port: u16,
    ) -> Result<Self, AnnotationError> {
        let get = |key: &str| annotations.get(key).map(|v| v.trim());

        let proxy_port = match get(PROXY_PORT) {
            None => defaults.proxy_port,
            Some("off") => None,
            Some(v) => Some(parse_port(PROXY_PORT, v)?),
        };
        if proxy_port == Some(admin_port) {
            return Err(AnnotationError::new(
                PROXY_PORT,
                format!("port {admin_port} is the sidecar's admin port; choose another"),
            ));
        }

        let mut ports: Vec<(String, PortMapping)> = Vec::new();
        for spec in get(PORTS)
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            let mapping: PortMapping = spec
                .parse()
                .map_err(|e: String| AnnotationError::new(PORTS, e))?;
            let port = mapping.port;
            if let Some((other, _)) = ports.iter().find(|(_, m)| m.port == port) {
                return Err(AnnotationError::new(
                    PORTS,
                    format!("port {port} is used twice ({other:?} and {spec:?})"),
                ));
            }
            if Some(port) == proxy_port {
                return Err(AnnotationError::new(
                    PORTS,
                    format!(
                        "{spec:?}: port {port} is the sidecar's HTTP proxy port (set {PROXY_PORT} to move it)"
                    ),
                ));
            }
            if port == admin_port {
                return Err(AnnotationError::new(
                    PORTS,
                    format!("{spec:?}: port {port} is the sidecar's admin port"),
                ));
            }
            ports.push((spec.to_owned(), mapping));
        }

        let set_proxy_env = match get(SET_PROXY_ENV) {
            None => defaults.set_proxy_env,
            Some(v) => parse_bool(SET_PROXY_ENV, v)?,
        };

        let default_cluster = match get(DEFAULT_CLUSTER) {
            None => None,
            Some(v) => {
                validate_cluster_name(v)
                    .map_err(|e| AnnotationError::new(DEFAULT_CLUSTER, e.to_string()))?;
                Some(v.to_owned())
            }
        };

        let direct = match get(DIRECT) {
            None => DirectPolicy::Allow,
            Some(v) => v
                .parse()
                .map_err(|e: String| AnnotationError::new(DIRECT, e))?,
        };

        let mut resources = defaults.resources.clone();
        for (key, slot) in [
            (CPU_REQUEST, &mut resources.cpu_request),
            (MEMORY_REQUEST, &mut resources.memory_request),
            (CPU_LIMIT, &mut resources.cpu_limit),
            (MEMORY_LIMIT, &mut resources.memory_limit),
        ] {
            if let Some(v) = get(key) {
                parse_quantity(v).map_err(|e| AnnotationError::new(key, e.to_string()))?;
                *slot = Some(v.to_owned());
            }
        }
        let cpu_by_annotation = get(CPU_REQUEST).is_some();
        let memory_by_annotation = get(MEMORY_REQUEST).is_some();
        fit_request(
            &mut resources.cpu_request,
            &resources.cpu_limit,
            cpu_by_annotation,
            (CPU_REQUEST, CPU_LIMIT),
        )?;
        fit_request(
            &mut resources.memory_request,
            &resources.memory_limit,
            memory_by_annotation,
            (MEMORY_REQUEST, MEMORY_LIMIT),
        )?;

        let log_level = match get(LOG_LEVEL) {
            None => defaults.log_level.clone(),
            Some(v) => {
                if v.is_empty()
                    || v.len() > MAX_LOG_LEVEL_LEN
                    || v.chars().any(|c| c.is_whitespace() || c.is_control())
                {
                    return Err(AnnotationError::new(
                        LOG_LEVEL,
                        format!(
                            "{v:?} is not a log filter (e.g. info, debug, tunnel_sidecar=debug; no spaces, at most {MAX_LOG_LEVEL_LEN} characters)"
                        ),
                    ));
                }
                v.to_owned()
            }
        };

        let mode = match get(MODE) {
            None => defaults.mode,
            Some("native") => Mode::Native,
            Some("legacy") => Mode::Legacy,
            Some(v) => {
                return Err(AnnotationError::new(
                    MODE,
                    format!("{v:?}: expected native or legacy"),
                ));
            }
        };

        let unknown = annotations
            .keys()
            .filter(|k| k.starts_with(PREFIX) && !KNOWN.contains(&k.as_str()))
            .cloned()
            .collect();

        Ok(Self {
            ports,
            proxy_port,
            set_proxy_env,
            default_cluster,
            direct,
            resources,
            log_level,
            mode,
            unknown,
        })
    }

    /// Every loopback port the sidecar listens on, with the annotation that
    /// chose it (the admin port is the injector's `--sidecar-admin-port`).
    pub fn listening_ports(&self, admin_port: u16) -> Vec<ListeningPort> {
        let mut out = vec![ListeningPort::new(admin_port, ADMIN_PORT_FLAG)];
        if let Some(p) = self.proxy_port {
            out.push(ListeningPort::new(p, PROXY_PORT));
        }
        out.extend(
            self.ports
                .iter()
                .map(|(_, m)| ListeningPort::new(m.port, PORTS)),
        );
        out
    }
}

/// A request above its limit is an error when the annotation set it; a
/// default request above a limit the annotation set is lowered to the limit
/// (as Kubernetes would default a missing request).
fn fit_request(
    request: &mut Option<String>,
    limit: &Option<String>,
    request_by_annotation: bool,
    (request_key, limit_key): (&str, &str),
) -> Result<(), AnnotationError> {
    let (Some(req), Some(lim)) = (request.as_deref(), limit.as_deref()) else {
        return Ok(());
    };
    let (Ok(r), Ok(l)) = (parse_quantity(req), parse_quantity(lim)) else {
        return Ok(()); // defaults are validated by the injector's flags
    };
    if r <= l {
        return Ok(());
    }
    if request_by_annotation {
        return Err(AnnotationError::new(
            request_key,
            format!("{req} is more than the limit {lim} ({limit_key})"),
        ));
    }
    *request = Some(lim.to_owned());
    Ok(())
}

fn parse_bool(key: &str, value: &str) -> Result<bool, AnnotationError> {
    let v = value.trim();
    if v.eq_ignore_ascii_case("true") {
        Ok(true)
    } else if v.eq_ignore_ascii_case("false") {
        Ok(false)
    } else {
        Err(AnnotationError::new(
            key,
            format!("{value:?}: expected \"true\" or \"false\""),
        ))
    }
}

fn parse_port(key: &str, value: &str) -> Result<u16, AnnotationError> {
    value
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| {
            AnnotationError::new(key, format!("{value:?} is not a port (1-65535) or off"))
        })
}

/// A value that is no Kubernetes resource quantity (or a negative one).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a Kubernetes quantity (e.g. 100m or 0.5 for CPU, 64Mi or 1G for memory)")]
pub struct QuantityError(pub String);

/// Parses a Kubernetes resource quantity (`100m`, `0.5`, `64Mi`, `1e3`, `2G`)
/// into its value, refusing negative and malformed ones.
pub fn parse_quantity(s: &str) -> Result<f64, QuantityError> {
    let bad = || QuantityError(s.to_owned());
    let s = s.trim();
    let unsigned = s.strip_prefix('+').unwrap_or(s);
    let digits_end = unsigned
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(unsigned.len());
    let (number, suffix) = unsigned.split_at(digits_end);
    if number.is_empty() || number == "." || number.matches('.').count() > 1 {
        return Err(bad());
    }
    let value: f64 = number.parse().map_err(|_| bad())?;
    let multiplier = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        e if e.starts_with(['e', 'E']) => {
            let exp = &e[1..];
            let digits = exp.strip_prefix(['+', '-']).unwrap_or(exp);
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            10f64.powi(exp.parse::<i32>().map_err(|_| bad())?)
        }
        _ => return Err(bad()),
    };
    Ok(value * multiplier)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn defaults() -> Defaults {
        Defaults {
            proxy_port: Some(17080),
            set_proxy_env: true,
            resources: Resources {
                cpu_request: Some("10m".into()),
                memory_request: Some("32Mi".into()),
                cpu_limit: None,
                memory_limit: None,
            },
            log_level: "info".into(),
            mode: Mode::Native,
        }
    }

    fn options(pairs: &[(&str, &str)]) -> Result<PodOptions, AnnotationError> {
        PodOptions::from_annotations(&map(pairs), &defaults(), 17090)
    }

    #[test]
    fn the_annotation_opts_in_and_the_label_opts_out() {
        let none = BTreeMap::new();
        assert_eq!(opt_in(&map(&[(INJECT, "true")]), &none), Ok(OptIn::Yes));
        assert_eq!(opt_in(&map(&[(INJECT, "True")]), &none), Ok(OptIn::Yes));
        assert!(matches!(
            opt_in(&map(&[(INJECT, "false")]), &none),
            Ok(OptIn::No(_))
        ));
        assert!(matches!(opt_in(&none, &none), Ok(OptIn::No(_))));
        assert!(matches!(
            opt_in(&map(&[(INJECT, "true")]), &map(&[(INJECT, "false")])),
            Ok(OptIn::No("opted out by label"))
        ));
        let err = opt_in(&map(&[(INJECT, "yes")]), &none).unwrap_err();
        assert_eq!(err.annotation, INJECT);
        assert!(err.to_string().contains("expected \"true\""), "{err}");
    }

    #[test]
    fn defaults_apply_without_annotations() {
        let o = options(&[(INJECT, "true")]).unwrap();
        assert!(o.ports.is_empty());
        assert_eq!(o.proxy_port, Some(17080));
        assert!(o.set_proxy_env);
        assert_eq!(o.mode, Mode::Native);
        assert_eq!(o.direct, DirectPolicy::Allow);
        assert_eq!(o.resources, defaults().resources);
        assert_eq!(o.log_level, "info");
        assert!(o.unknown.is_empty());
    }

    #[test]
    fn every_annotation_is_read() {
        let o = options(&[
            (
                PORTS,
                " 17001=east, 17002=east:prometheus.monitoring.svc:9090 ,",
            ),
            (PROXY_PORT, "18080"),
            (SET_PROXY_ENV, "false"),
            (DEFAULT_CLUSTER, "west"),
            (DIRECT, "deny"),
            (CPU_REQUEST, "50m"),
            (MEMORY_REQUEST, "64Mi"),
            (CPU_LIMIT, "1"),
            (MEMORY_LIMIT, "128Mi"),
            (LOG_LEVEL, "tunnel_sidecar=debug,info"),
            (MODE, "legacy"),
            ("cluster-tunnel.io/port", "17001=east"),
        ])
        .unwrap();
        assert_eq!(
            o.ports.iter().map(|(s, _)| s.as_str()).collect::<Vec<_>>(),
            ["17001=east", "17002=east:prometheus.monitoring.svc:9090"]
        );
        assert_eq!(o.ports[1].1.host, "prometheus.monitoring.svc");
        assert_eq!(o.proxy_port, Some(18080));
        assert!(!o.set_proxy_env);
        assert_eq!(o.default_cluster.as_deref(), Some("west"));
        assert_eq!(o.direct, DirectPolicy::Deny);
        assert_eq!(o.resources.cpu_limit.as_deref(), Some("1"));
        assert_eq!(o.resources.memory_request.as_deref(), Some("64Mi"));
        assert_eq!(o.log_level, "tunnel_sidecar=debug,info");
        assert_eq!(o.mode, Mode::Legacy);
        assert_eq!(o.unknown, ["cluster-tunnel.io/port"]);
        assert_eq!(
            options(&[(PROXY_PORT, "off")]).unwrap().proxy_port,
            None,
            "off disables the proxy"
        );
    }

    #[test]
    fn invalid_values_name_their_annotation() {
        for (pairs, key, why) in [
            (&[(PORTS, "17001=East")][..], PORTS, "lowercase"),
            (&[(PORTS, "17001")], PORTS, "expected PORT=CLUSTER"),
            (&[(PORTS, "17001=east,17001=west")], PORTS, "used twice"),
            (&[(PORTS, "17080=east")], PORTS, "HTTP proxy port"),
            (&[(PORTS, "17090=east")], PORTS, "admin port"),
            (&[(PROXY_PORT, "17090")], PROXY_PORT, "admin port"),
            (&[(PROXY_PORT, "http")], PROXY_PORT, "not a port"),
            (&[(PROXY_PORT, "0")], PROXY_PORT, "not a port"),
            (&[(SET_PROXY_ENV, "no")], SET_PROXY_ENV, "expected"),
            (&[(DEFAULT_CLUSTER, "East_1")], DEFAULT_CLUSTER, "lowercase"),
            (&[(DIRECT, "sometimes")], DIRECT, "allow or deny"),
            (&[(CPU_REQUEST, "lots")], CPU_REQUEST, "quantity"),
            (&[(MEMORY_LIMIT, "-1Gi")], MEMORY_LIMIT, "quantity"),
            (&[(MEMORY_LIMIT, "1Gb")], MEMORY_LIMIT, "quantity"),
            (
                &[(CPU_REQUEST, "2"), (CPU_LIMIT, "500m")],
                CPU_REQUEST,
                "more than the limit",
            ),
            (
                &[(LOG_LEVEL, "debug please")],
                LOG_LEVEL,
                "not a log filter",
            ),
            (&[(MODE, "sidecar")], MODE, "native or legacy"),
        ] {
            let err = options(pairs).unwrap_err();
            assert_eq!(err.annotation, key, "{pairs:?}: {err}");
            assert!(err.to_string().contains(key), "{err}");
            assert!(err.reason.contains(why), "{pairs:?}: {err}");
        }
    }

    #[test]
    fn a_default_request_shrinks_to_a_smaller_limit() {
        let o = options(&[(MEMORY_LIMIT, "16Mi")]).unwrap();
        assert_eq!(o.resources.memory_request.as_deref(), Some("16Mi"));
        assert_eq!(o.resources.memory_limit.as_deref(), Some("16Mi"));
    }

    #[test]
    fn quantities_parse_like_kubernetes() {
        for (s, v) in [
            ("100m", 0.1),
            ("0.5", 0.5),
            ("2", 2.0),
            (".5", 0.5),
            ("+1", 1.0),
            ("64Mi", 64.0 * 1024.0 * 1024.0),
            ("1G", 1e9),
            ("1e3", 1000.0),
            ("5E-1", 0.5),
            ("12Ki", 12288.0),
        ] {
            let got = parse_quantity(s).unwrap();
            assert!((got - v).abs() < 1e-9 * v.max(1.0), "{s}: {got} != {v}");
        }
        for s in ["", "m", "1.2.3", "1Gb", "-1", "1e", "1e+", "ten", "1 Gi"] {
            assert!(parse_quantity(s).is_err(), "{s:?} should be refused");
        }
    }
}
