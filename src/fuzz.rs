//! Property-based fuzzing of every parser fed from outside the agent (test builds only): the
//! create request, the SSH key line, QEMU's monitor lines, nvidia-smi's CSV, frpc's admin
//! status and the control plane's `/init` answer. Each target runs a bounded number of cases
//! in CI (`QUDATA_FUZZ_CASES`, default 1,000); none may panic, and what is accepted must keep
//! the parser's promises. Inputs that once broke a parser stay below as regression cases.

use proptest::prelude::*;
use serde_json::{Map, Value};

/// Cases per target: bounded so the test command stays short; raise it to hunt.
pub fn config() -> ProptestConfig {
    let cases = std::env::var("QUDATA_FUZZ_CASES").ok().and_then(|v| v.parse().ok());
    ProptestConfig { cases: cases.unwrap_or(1000), failure_persistence: None, ..Default::default() }
}

/// Text a hostile peer would send: any characters, with control characters, quotes, long
/// runs and the separators parsers split on made likely.
pub fn hostile_text() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,64}",
        "[ -~]{0,64}",
        "[\\x00-\\x1f,;:=\"'\\\\ \\n\\r\\t]{0,32}",
        "[0-9a-fA-F:.,]{0,40}",
        Just("9".repeat(400)),
        Just(String::new()),
    ]
}

/// Any JSON value, nested a few levels, with the keys the agent's parsers look for likely.
pub fn json(keys: &'static [&'static str]) -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        (0u32..70_000).prop_map(Value::from),
        hostile_text().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, move |inner| {
        let key =
            prop_oneof![proptest::sample::select(keys).prop_map(str::to_owned), "[a-z_]{1,12}"];
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::vec((key, inner), 0..8)
                .prop_map(|pairs| Value::Object(pairs.into_iter().collect::<Map<_, _>>())),
        ]
    })
}
