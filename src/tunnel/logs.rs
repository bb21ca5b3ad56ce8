//! Forwards frpc's output (a file, see `process::log_file`) into the agent's log, line by line,
//! at the level frp printed it with.

use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::time::Duration;

/// Past this size, the forwarder truncates the file once it has read everything (frpc writes
/// with O_APPEND, so it carries on at the new end).
const MAX_LOG_BYTES: u64 = 8 << 20;
const POLL: Duration = Duration::from_millis(200);

/// frp prints `2024/01/02 15:04:05 [I] [service.go:301] …`; `[E]`, `[W]`, `[I]`, `[D]`, `[T]`.
pub fn frp_level(line: &str) -> tracing::Level {
    let tag =
        line.split_whitespace().find(|w| w.len() == 3 && w.starts_with('[') && w.ends_with(']'));
    match tag {
        Some("[E]") => tracing::Level::ERROR,
        Some("[W]") => tracing::Level::WARN,
        Some("[D]") | Some("[T]") => tracing::Level::DEBUG,
        Some("[I]") => tracing::Level::INFO,
        // Untagged output is a Go panic or a start-up failure.
        _ => tracing::Level::WARN,
    }
}

fn emit(line: &str) {
    let line = line.trim_end();
    if line.is_empty() {
        return;
    }
    match frp_level(line) {
        tracing::Level::ERROR => tracing::error!(target: "frpc", "{line}"),
        tracing::Level::DEBUG => tracing::debug!(target: "frpc", "{line}"),
        tracing::Level::INFO => tracing::info!(target: "frpc", "{line}"),
        _ => tracing::warn!(target: "frpc", "{line}"),
    }
}

/// Follows `path` until the task is aborted: from its start for an frpc just spawned, from its
/// end for an adopted one (earlier lines were logged by the earlier agent).
pub async fn forward(path: PathBuf, from_start: bool) {
    let end = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    let mut offset = if from_start { 0 } else { end };
    let mut pending = String::new();
    loop {
        tokio::time::sleep(POLL).await;
        let Ok(mut file) = std::fs::File::open(&path) else { continue };
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        if len < offset {
            offset = 0; // frpc was restarted (file truncated)
            pending.clear();
        }
        if len == offset {
            continue;
        }
        let mut buf = Vec::new();
        if file.seek(SeekFrom::Start(offset)).is_err() || file.read_to_end(&mut buf).is_err() {
            continue;
        }
        offset += buf.len() as u64;
        pending.push_str(&String::from_utf8_lossy(&buf));
        while let Some(end) = pending.find('\n') {
            emit(&pending[..end]);
            pending.drain(..=end);
        }
        if offset > MAX_LOG_BYTES && pending.is_empty() {
            let truncated = std::fs::OpenOptions::new().write(true).open(&path);
            if truncated.and_then(|f| f.set_len(0)).is_ok() {
                offset = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_follow_frps_tags() {
        let l = |s| frp_level(s);
        assert_eq!(
            l("2024/01/02 15:04:05 [E] [control.go:1] login to server failed"),
            tracing::Level::ERROR
        );
        assert_eq!(l("2024/01/02 15:04:05 [W] [proxy.go:1] start error"), tracing::Level::WARN);
        assert_eq!(l("2024/01/02 15:04:05 [I] [service.go:1] login ok"), tracing::Level::INFO);
        assert_eq!(l("2024/01/02 15:04:05 [D] [x.go:1] detail"), tracing::Level::DEBUG);
        assert_eq!(l("panic: runtime error"), tracing::Level::WARN);
    }
}
