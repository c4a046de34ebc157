//! Children's output lines, re-logged by the launcher at their own level and without their own
//! timestamp: JSON lines from `tracing-subscriber` (the router, started with `--json-output`)
//! and Python `logging` lines (`2024-01-01 12:00:00,123 INFO name: message`, the shard's format).
//! Anything else is logged as it is, at INFO.

use tracing::Level;

/// A child's line, split into its level and its text.
#[derive(Debug, PartialEq)]
pub struct LogLine {
    pub level: Level,
    pub text: String,
}

pub fn parse(line: &str) -> LogLine {
    parse_tracing_json(line)
        .or_else(|| parse_python(line))
        .unwrap_or_else(|| LogLine {
            level: Level::INFO,
            text: line.to_string(),
        })
}

/// Logs `line` at its level in the current span.
pub fn emit(line: &LogLine) {
    let text = &line.text;
    match line.level {
        Level::ERROR => tracing::error!("{text}"),
        Level::WARN => tracing::warn!("{text}"),
        Level::INFO => tracing::info!("{text}"),
        Level::DEBUG => tracing::debug!("{text}"),
        Level::TRACE => tracing::trace!("{text}"),
    }
}

fn level_named(name: &str) -> Option<Level> {
    match name.to_ascii_uppercase().as_str() {
        "ERROR" | "CRITICAL" | "FATAL" => Some(Level::ERROR),
        "WARN" | "WARNING" => Some(Level::WARN),
        "INFO" => Some(Level::INFO),
        "DEBUG" => Some(Level::DEBUG),
        "TRACE" => Some(Level::TRACE),
        _ => None,
    }
}

/// `{"timestamp":..,"level":"INFO","fields":{"message":"..", "k": v},"target":".."}`.
fn parse_tracing_json(line: &str) -> Option<LogLine> {
    if !line.starts_with('{') {
        return None;
    }
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    let level = level_named(value.get("level")?.as_str()?)?;
    let fields = value.get("fields")?.as_object()?;
    let mut text = fields
        .get("message")
        .and_then(|m| m.as_str())
        .unwrap_or_default()
        .to_string();
    for (key, field) in fields.iter().filter(|(k, _)| *k != "message") {
        let shown = match field {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        text.push_str(&format!(" {key}={shown}"));
    }
    // The router's request and batch spans carry the trace id: keep it for correlation.
    if let Some(trace_id) = value.pointer("/span/trace_id").and_then(|t| t.as_str()) {
        text.push_str(&format!(" trace_id={trace_id}"));
    }
    Some(LogLine { level, text })
}

/// `2024-01-01 12:00:00,123 LEVEL rest`: the date and time are dropped.
fn parse_python(line: &str) -> Option<LogLine> {
    let mut parts = line.splitn(4, ' ');
    let date = parts.next()?;
    let time = parts.next()?;
    let level = level_named(parts.next()?)?;
    let rest = parts.next()?;
    let looks_like_date = date.len() == 10 && date.as_bytes()[4] == b'-';
    let looks_like_time = time.len() >= 8 && time.as_bytes()[2] == b':';
    (looks_like_date && looks_like_time).then(|| LogLine {
        level,
        text: rest.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracing_json_lines_keep_level_message_and_fields() {
        let line = r#"{"timestamp":"2026-01-01T00:00:00Z","level":"WARN","fields":{"message":"slow","ms":12,"who":"a"},"target":"lorax_router"}"#;
        assert_eq!(
            parse(line),
            LogLine {
                level: Level::WARN,
                text: "slow ms=12 who=a".to_string()
            }
        );
    }

    #[test]
    fn the_trace_id_of_the_current_span_is_kept() {
        let line = r#"{"level":"ERROR","fields":{"message":"decode failed"},"span":{"name":"decode","trace_id":"4bf92f3577b34da6a3ce929d0e0e4736"},"spans":[]}"#;
        assert_eq!(
            parse(line).text,
            "decode failed trace_id=4bf92f3577b34da6a3ce929d0e0e4736"
        );
    }

    #[test]
    fn python_logging_lines_drop_their_timestamp() {
        let line = "2026-11-29 03:26:48,649 ERROR lorax_server.server: boom";
        assert_eq!(
            parse(line),
            LogLine {
                level: Level::ERROR,
                text: "lorax_server.server: boom".to_string()
            }
        );
        let warning = parse("2026-11-29 03:26:48,649 WARNING x: y");
        assert_eq!(warning.level, Level::WARN);
    }

    #[test]
    fn other_lines_pass_through_at_info() {
        for line in [
            "Traceback (most recent call last):",
            "{not json",
            "{\"level\":\"INFO\"}",
            "2026-11-29 03:26:48,649 NOTALEVEL x",
            "",
        ] {
            assert_eq!(
                parse(line),
                LogLine {
                    level: Level::INFO,
                    text: line.to_string()
                },
                "{line}"
            );
        }
    }
}
