//! Log setup: human lines on a terminal, JSON under systemd (journald), `QUDATA_DEBUG` for
//! verbosity, `RUST_LOG` to override per module.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

pub fn init(debug: bool) {
    init_with(if debug { "debug,hyper=info,russh=info" } else { "info" });
}

/// For one-shot commands (`recover`) whose output is the answer: warnings only by default.
pub fn init_for_command(debug: bool) {
    init_with(if debug { "debug,hyper=info,russh=info" } else { "warn" });
}

fn init_with(default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let under_systemd = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let result = if under_systemd && !std::io::stderr().is_terminal() {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
    // A second init (tests) keeps the first subscriber.
    let _ = result;
}
