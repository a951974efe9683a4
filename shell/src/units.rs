//! Values with units, as flags, environment variables and configuration
//! files write them: durations (`500ms`, `10s`, `2m`, `1h`), byte sizes
//! (`256KiB`, `16MiB`, `1GiB`) and the sizes built on them.

use std::time::Duration;

/// A value that does not parse, naming the value and what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// No number where one was expected.
    #[error("invalid {kind} {value:?}: expected a number with a unit, e.g. {example}")]
    NotANumber {
        /// What the value is (`duration`, `size`).
        kind: &'static str,
        /// The value as given.
        value: String,
        /// A value that would parse.
        example: &'static str,
    },
    /// A number with a unit this kind of value does not know.
    #[error("invalid {kind} {value:?}: unknown unit {unit:?} (use {units})")]
    UnknownUnit {
        /// What the value is.
        kind: &'static str,
        /// The value as given.
        value: String,
        /// The unit as given.
        unit: String,
        /// The units that parse.
        units: &'static str,
    },
    /// A well-formed value outside what it may be.
    #[error("invalid {kind} {value:?}: {range}")]
    OutOfRange {
        /// What the value is (`duration`, `size`, `window`, `socket buffer`).
        kind: &'static str,
        /// The value as given.
        value: String,
        /// What it may be.
        range: &'static str,
    },
}

/// Parses durations such as `500ms`, `10s`, `2m`, `1h`, or bare seconds (`30`).
pub fn parse_duration(s: &str) -> Result<Duration, ValueError> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num.parse().map_err(|_| ValueError::NotANumber {
        kind: "duration",
        value: s.to_owned(),
        example: "10s or 500ms",
    })?;
    let secs = match unit {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => {
            return Err(ValueError::UnknownUnit {
                kind: "duration",
                value: s.to_owned(),
                unit: unit.to_owned(),
                units: "ms, s, m or h",
            });
        }
    };
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(ValueError::OutOfRange {
            kind: "duration",
            value: s.to_owned(),
            range: "out of range",
        });
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses byte sizes such as `256KiB`, `16MiB`, `1GiB`, or bare bytes.
pub fn parse_bytes(s: &str) -> Result<u64, ValueError> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: u64 = num.parse().map_err(|_| ValueError::NotANumber {
        kind: "size",
        value: s.to_owned(),
        example: "256KiB",
    })?;
    let scale: u64 = match unit {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => {
            return Err(ValueError::UnknownUnit {
                kind: "size",
                value: s.to_owned(),
                unit: unit.to_owned(),
                units: "B, KiB, MiB or GiB",
            });
        }
    };
    value
        .checked_mul(scale)
        .ok_or_else(|| ValueError::OutOfRange {
            kind: "size",
            value: s.to_owned(),
            range: "out of range",
        })
}

/// Parses a `--socket-buffer` value: a size such as `256KiB`, or `0` for
/// the kernel's autotuning (see `tunnel_proto::net::cap_socket_buffers`).
pub fn parse_socket_buffer(s: &str) -> Result<usize, ValueError> {
    let v = parse_bytes(s)?;
    if v != 0 && !(4096..=64 * 1024 * 1024).contains(&v) {
        return Err(ValueError::OutOfRange {
            kind: "socket buffer",
            value: s.to_owned(),
            range: "0 (kernel autotuning) or between 4KiB and 64MiB",
        });
    }
    Ok(v as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("30").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
    }

    #[test]
    fn bad_durations_say_why() {
        assert_eq!(
            parse_duration("ten").unwrap_err().to_string(),
            "invalid duration \"ten\": expected a number with a unit, e.g. 10s or 500ms"
        );
        assert_eq!(
            parse_duration("10y").unwrap_err().to_string(),
            "invalid duration \"10y\": unknown unit \"y\" (use ms, s, m or h)"
        );
        assert!(parse_duration("").is_err());
        assert!(matches!(
            parse_duration("99999999999h"),
            Err(ValueError::OutOfRange { .. })
        ));
    }

    #[test]
    fn sizes_parse_with_units_and_bad_ones_say_why() {
        assert_eq!(parse_bytes("256KiB").unwrap(), 256 * 1024);
        assert_eq!(parse_bytes("16MiB").unwrap(), 16 << 20);
        assert_eq!(parse_bytes("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert_eq!(
            parse_bytes("16MB").unwrap_err().to_string(),
            "invalid size \"16MB\": unknown unit \"MB\" (use B, KiB, MiB or GiB)"
        );
        assert!(matches!(
            parse_bytes("99999999999GiB"),
            Err(ValueError::OutOfRange { .. })
        ));
    }

    #[test]
    fn socket_buffers_are_zero_or_a_sane_size() {
        assert_eq!(parse_socket_buffer("0"), Ok(0));
        assert_eq!(parse_socket_buffer("256KiB"), Ok(256 * 1024));
        for bad in ["1KiB", "65MiB", "lots", "-1"] {
            assert!(parse_socket_buffer(bad).is_err(), "{bad} was accepted");
        }
    }
}
