//! Go duration strings ("720h", "1h30m", "1.5s") as used in Kubernetes specs, restricted to the
//! form the CRD schema's pattern accepts: no sign, at least one `<number><unit>` group.
//!
//! Spec fields keep the string exactly as the user wrote it (a typed duration would re-render
//! "720h" as "2592000s" on every write); this parser turns it into a [`Duration`] on use.

use std::time::Duration;

/// The strings [`parse_go_duration`] accepts, as a regular expression for CRD schemas.
pub const GO_DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|μs|ms|s|m|h))+$";

/// Why a duration string was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DurationError {
    #[error("empty duration")]
    Empty,
    #[error("expected a number at byte {offset} of {:?}", shown(.text))]
    MissingNumber { text: String, offset: usize },
    #[error(
        "missing unit after the number at byte {offset} of {:?} (one of ns, us, µs, ms, s, m, h)", shown(.text)
    )]
    MissingUnit { text: String, offset: usize },
    #[error("unknown unit {:?} in {:?} (one of ns, us, µs, ms, s, m, h)", shown(.unit), shown(.text))]
    UnknownUnit { text: String, unit: String },
    #[error("duration {:?} is too large", shown(.text))]
    Overflow { text: String },
}

/// A hostile value as errors show it: at most 40 characters, anything but printable ASCII (and
/// the quote and backslash `{:?}` would escape) as '?', "..." when cut. Spec errors end up in
/// Events, conditions and logs, however long the value is.
pub(crate) fn shown(text: &str) -> String {
    const MAX: usize = 40;
    let mut out: String = text
        .chars()
        .take(MAX)
        .map(|c| {
            if (c == ' ' || c.is_ascii_graphic()) && c != '"' && c != '\\' {
                c
            } else {
                '?'
            }
        })
        .collect();
    if text.chars().nth(MAX).is_some() {
        out.push_str("...");
    }
    out
}

/// Parses a non-negative Go duration such as "720h", "1h30m" or "0.5s".
pub fn parse_go_duration(text: &str) -> Result<Duration, DurationError> {
    if text.is_empty() {
        return Err(DurationError::Empty);
    }
    let overflow = || DurationError::Overflow {
        text: text.to_owned(),
    };
    let mut total_nanos: u128 = 0;
    let mut rest = text;
    while !rest.is_empty() {
        let offset = text.len() - rest.len();
        let int_len = rest.bytes().take_while(u8::is_ascii_digit).count();
        if int_len == 0 {
            return Err(DurationError::MissingNumber {
                text: text.to_owned(),
                offset,
            });
        }
        let (int_part, after_int) = rest.split_at(int_len);
        let (frac_part, after_number) = match after_int.strip_prefix('.') {
            Some(after_dot) => {
                let frac_len = after_dot.bytes().take_while(u8::is_ascii_digit).count();
                if frac_len == 0 {
                    return Err(DurationError::MissingNumber {
                        text: text.to_owned(),
                        offset: offset + int_len + 1,
                    });
                }
                after_dot.split_at(frac_len)
            }
            None => ("", after_int),
        };
        let unit_len = after_number
            .char_indices()
            .find(|&(_, c)| c.is_ascii_digit() || c == '.')
            .map_or(after_number.len(), |(i, _)| i);
        let (unit, next) = after_number.split_at(unit_len);
        if unit.is_empty() {
            return Err(DurationError::MissingUnit {
                text: text.to_owned(),
                offset: text.len() - after_number.len(),
            });
        }
        let unit_nanos: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => {
                return Err(DurationError::UnknownUnit {
                    text: text.to_owned(),
                    unit: unit.to_owned(),
                });
            }
        };
        let whole: u128 = int_part.parse().map_err(|_| overflow())?;
        let mut nanos = whole.checked_mul(unit_nanos).ok_or_else(overflow)?;
        // Fractions are exact down to the nanosecond; digits beyond that are truncated, as in Go.
        let mut scale = unit_nanos;
        for digit in frac_part.bytes() {
            scale /= 10;
            if scale == 0 {
                break;
            }
            nanos += u128::from(digit - b'0') * scale;
        }
        total_nanos = total_nanos.checked_add(nanos).ok_or_else(overflow)?;
        rest = next;
    }
    let secs = u64::try_from(total_nanos / 1_000_000_000).map_err(|_| overflow())?;
    let subsec = u32::try_from(total_nanos % 1_000_000_000).map_err(|_| overflow())?;
    Ok(Duration::new(secs, subsec))
}

/// What a spec duration field may hold besides durations of at least the minimum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Zero {
    /// "0s" is below the minimum like any other short duration.
    Rejected,
    /// "0s" is accepted: it switches the feature the field times off.
    Accepted,
}

/// A spec duration field checked by the rules the API server applies: a Go duration (`invalid`
/// builds the error otherwise) of at least `min` (`too_short` builds the error otherwise), or zero
/// where `zero` accepts it. Both error builders get the text as written.
pub(crate) fn parse_spec_duration<E>(
    value: &str,
    min: Duration,
    zero: Zero,
    invalid: impl FnOnce(String, DurationError) -> E,
    too_short: impl FnOnce(String) -> E,
) -> Result<Duration, E> {
    let duration = parse_go_duration(value).map_err(|source| invalid(value.to_owned(), source))?;
    if duration < min && !(zero == Zero::Accepted && duration.is_zero()) {
        return Err(too_short(value.to_owned()));
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_single_units() {
        let cases = [
            ("720h", Duration::from_secs(720 * 3600)),
            ("90m", Duration::from_secs(90 * 60)),
            ("45s", Duration::from_secs(45)),
            ("250ms", Duration::from_millis(250)),
            ("7us", Duration::from_micros(7)),
            ("7µs", Duration::from_micros(7)),
            ("3ns", Duration::from_nanos(3)),
            ("0s", Duration::ZERO),
        ];
        for (text, want) in cases {
            assert_eq!(parse_go_duration(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn parses_compound_and_fractional() {
        assert_eq!(parse_go_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_go_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(
            parse_go_duration("2h45m30.5s"),
            Ok(Duration::from_millis(
                (2 * 3600 + 45 * 60 + 30) * 1000 + 500
            ))
        );
        // Digits beyond nanosecond precision are dropped.
        assert_eq!(parse_go_duration("1.0000000019s"), Ok(Duration::new(1, 1)));
    }

    #[test]
    fn rejects_malformed_text_with_reason() {
        assert_eq!(parse_go_duration(""), Err(DurationError::Empty));
        assert!(matches!(
            parse_go_duration("h"),
            Err(DurationError::MissingNumber { offset: 0, .. })
        ));
        assert!(matches!(
            parse_go_duration("-5m"),
            Err(DurationError::MissingNumber { offset: 0, .. })
        ));
        assert!(matches!(
            parse_go_duration("720"),
            Err(DurationError::MissingUnit { offset: 3, .. })
        ));
        assert!(matches!(
            parse_go_duration("1h30"),
            Err(DurationError::MissingUnit { offset: 4, .. })
        ));
        assert!(matches!(
            parse_go_duration("1.h"),
            Err(DurationError::MissingNumber { offset: 2, .. })
        ));
        assert!(matches!(
            parse_go_duration("3d"),
            Err(DurationError::UnknownUnit { ref unit, .. }) if unit == "d"
        ));
        assert!(matches!(
            parse_go_duration("1 h"),
            Err(DurationError::UnknownUnit { ref unit, .. }) if unit == " h"
        ));
        assert!(matches!(
            parse_go_duration("99999999999999999999999999999999999999999h"),
            Err(DurationError::Overflow { .. })
        ));
    }

    #[test]
    fn error_messages_name_the_input() {
        let err = parse_go_duration("3d").unwrap_err().to_string();
        assert!(
            err.contains("\"3d\"") && err.contains("unknown unit"),
            "{err}"
        );
    }

    /// Found by the `specs` fuzz target's corpus test (a whole JSON document read as a
    /// duration): errors quoted the entire value. They show at most 40 characters of it now,
    /// printable ASCII only, so a hostile spec cannot make a huge Event or condition message.
    #[test]
    fn errors_quote_a_short_printable_prefix_of_the_value() {
        let hostile = format!("{{\"x\":\"{}\u{1b}\"}}", "y".repeat(5000));
        let message = parse_go_duration(&hostile)
            .expect_err("not a duration")
            .to_string();
        assert_eq!(
            message,
            format!(
                "expected a number at byte 0 of \"{{?x?:?{}...\"",
                "y".repeat(34)
            )
        );
        let unit = parse_go_duration(&format!("1{}", "\u{1}".repeat(100)))
            .expect_err("bad unit")
            .to_string();
        assert!(unit.len() < 200, "{unit}");
        assert!(!unit.contains('\u{1}'), "{unit}");
    }
}
