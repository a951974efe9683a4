//! Typed tunnel errors: a code every side understands, plus a message for humans.
//!
//! The code travels as its label in a response header; callers branch on [`ErrorCode`], never on
//! message text. Each code has a stable metric label and an HTTP status for
//! proxies that speak HTTP to applications.

pub use crate::pb::ErrorCode;

/// A failure to open or carry a tunnelled connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", code.label())]
pub struct TunnelError {
    /// What went wrong, for programs.
    pub code: ErrorCode,
    /// What went wrong, for people.
    pub message: String,
}

impl TunnelError {
    /// An error with the given code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// An error a peer sent as its code label and message (the
    /// `tunnel-error` and `tunnel-message` headers). An unknown label (a newer
    /// peer) becomes `Internal`, keeping the label in the message.
    pub fn from_wire(label: &str, message: &str) -> Self {
        match ErrorCode::from_label(label) {
            Some(code) => Self::new(code, message),
            None => Self::new(ErrorCode::Internal, format!("{label}: {message}")),
        }
    }

    /// A gRPC control call that failed (status from the peer or transport).
    pub fn from_status(status: &tonic::Status) -> Self {
        let code = match status.code() {
            tonic::Code::Unauthenticated => ErrorCode::Unauthenticated,
            tonic::Code::PermissionDenied => ErrorCode::Forbidden,
            // Transport failures (reset, GOAWAY, connection lost) surface as these.
            tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
            | tonic::Code::Aborted => ErrorCode::TunnelBroken,
            tonic::Code::DeadlineExceeded => ErrorCode::DialTimeout,
            tonic::Code::InvalidArgument => ErrorCode::BadRequest,
            tonic::Code::ResourceExhausted => ErrorCode::ResourceExhausted,
            _ => ErrorCode::Internal,
        };
        Self::new(code, format!("call failed: {}", status.message()))
    }
}

impl ErrorCode {
    /// Stable snake_case name, used in logs, metrics and HTTP headers.
    pub fn label(self) -> &'static str {
        match self {
            ErrorCode::Unspecified => "unspecified",
            ErrorCode::UnknownCluster => "unknown_cluster",
            ErrorCode::NoAgent => "no_agent",
            ErrorCode::DestinationRefused => "destination_refused",
            ErrorCode::DestinationUnreachable => "destination_unreachable",
            ErrorCode::DnsFailure => "dns_failure",
            ErrorCode::DialTimeout => "dial_timeout",
            ErrorCode::DestinationNotAllowed => "destination_not_allowed",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::ServerDraining => "server_draining",
            ErrorCode::Internal => "internal",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::TunnelBroken => "tunnel_broken",
            ErrorCode::ResourceExhausted => "resource_exhausted",
        }
    }

    /// The code whose [`label`](Self::label) is `label`.
    pub fn from_label(label: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.label() == label)
    }

    /// The HTTP status an HTTP proxy answers with for this error.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::BadRequest => 400,
            ErrorCode::Unauthenticated => 407,
            ErrorCode::Forbidden | ErrorCode::DestinationNotAllowed => 403,
            ErrorCode::UnknownCluster => 404,
            ErrorCode::DestinationRefused
            | ErrorCode::DestinationUnreachable
            | ErrorCode::DnsFailure
            | ErrorCode::TunnelBroken => 502,
            ErrorCode::NoAgent | ErrorCode::ServerDraining | ErrorCode::ResourceExhausted => 503,
            ErrorCode::DialTimeout => 504,
            ErrorCode::Unspecified | ErrorCode::Internal => 500,
        }
    }

    /// Whether another agent of the same cluster may succeed where this one failed
    /// before the destination answered.
    pub fn is_retryable_on_other_agent(self) -> bool {
        matches!(self, ErrorCode::TunnelBroken | ErrorCode::ServerDraining)
    }

    /// Every code a peer can send, for exhaustive tests and docs.
    pub const ALL: [ErrorCode; 14] = [
        ErrorCode::UnknownCluster,
        ErrorCode::NoAgent,
        ErrorCode::DestinationRefused,
        ErrorCode::DestinationUnreachable,
        ErrorCode::DnsFailure,
        ErrorCode::DialTimeout,
        ErrorCode::DestinationNotAllowed,
        ErrorCode::Unauthenticated,
        ErrorCode::Forbidden,
        ErrorCode::ServerDraining,
        ErrorCode::Internal,
        ErrorCode::BadRequest,
        ErrorCode::TunnelBroken,
        ErrorCode::ResourceExhausted,
    ];
}

/// Classifies a failed TCP connect to a destination.
pub fn dial_error(dest: &str, err: &std::io::Error) -> TunnelError {
    use std::io::ErrorKind as K;
    let code = match err.kind() {
        K::ConnectionRefused => ErrorCode::DestinationRefused,
        K::TimedOut => ErrorCode::DialTimeout,
        K::HostUnreachable | K::NetworkUnreachable | K::AddrNotAvailable | K::ConnectionReset => {
            ErrorCode::DestinationUnreachable
        }
        _ => ErrorCode::DestinationUnreachable,
    };
    TunnelError::new(code, format!("dial {dest}: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips_through_its_label() {
        for code in ErrorCode::ALL {
            let err = TunnelError::new(code, "why");
            assert_eq!(TunnelError::from_wire(code.label(), "why"), err);
            assert!(!code.label().is_empty());
        }
    }

    #[test]
    fn an_unknown_label_from_a_newer_peer_reads_as_internal() {
        let e = TunnelError::from_wire("quota_gone", "new");
        assert_eq!(e.code, ErrorCode::Internal);
        assert!(e.message.contains("quota_gone"), "{e}");
    }

    #[test]
    fn refused_dials_are_classified() {
        let err = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(dial_error("a:1", &err).code, ErrorCode::DestinationRefused);
        assert_eq!(ErrorCode::DialTimeout.http_status(), 504);
        assert_eq!(ErrorCode::NoAgent.http_status(), 503);
    }
}
