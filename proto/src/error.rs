//! Typed tunnel errors: a code every side understands, plus a message for humans.
//!
//! The code travels in an `Error` frame; callers branch on [`ErrorCode`], never on
//! message text. Each code has a stable metric label and an HTTP status for
//! proxies that speak HTTP to applications.

use crate::pb;

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

    /// The `Error` frame that carries this error.
    pub fn to_frame(&self) -> pb::Frame {
        pb::Frame {
            kind: Some(pb::frame::Kind::Error(pb::Error {
                code: self.code as i32,
                message: self.message.clone(),
            })),
        }
    }

    /// Reads an `Error` message; an unknown code (a newer peer) becomes `Internal`.
    pub fn from_pb(err: &pb::Error) -> Self {
        let code = ErrorCode::try_from(err.code).unwrap_or(ErrorCode::Internal);
        Self::new(code, err.message.clone())
    }

    /// A stream that broke for a transport reason (gRPC status, HTTP/2 reset).
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
            _ => ErrorCode::Internal,
        };
        Self::new(code, format!("tunnel stream failed: {}", status.message()))
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
        }
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
            ErrorCode::NoAgent | ErrorCode::ServerDraining => 503,
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
    pub const ALL: [ErrorCode; 13] = [
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
    fn error_frames_round_trip_every_code() {
        for code in ErrorCode::ALL {
            let err = TunnelError::new(code, "why");
            let Some(pb::frame::Kind::Error(e)) = err.to_frame().kind else {
                panic!("not an error frame")
            };
            assert_eq!(TunnelError::from_pb(&e), err);
            assert!(!code.label().is_empty());
        }
    }

    #[test]
    fn an_unknown_code_from_a_newer_peer_reads_as_internal() {
        let e = pb::Error {
            code: 999,
            message: "new".into(),
        };
        assert_eq!(TunnelError::from_pb(&e).code, ErrorCode::Internal);
    }

    #[test]
    fn refused_dials_are_classified() {
        let err = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(dial_error("a:1", &err).code, ErrorCode::DestinationRefused);
        assert_eq!(ErrorCode::DialTimeout.http_status(), 504);
        assert_eq!(ErrorCode::NoAgent.http_status(), 503);
    }
}
