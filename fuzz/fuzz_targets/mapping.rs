//! A mapping (TOML) and a row (a JSON object), from one input split at its
//! first NUL byte: parsing, validating and applying the mapping never panic,
//! and every message it makes that is accepted reads back from the log.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use tandem_core::mapping::Mapping;
use tandem_fuzz::{normalize_mapped, source};

fuzz_target!(|input: &[u8]| {
    let Some(split) = input.iter().position(|byte| *byte == 0) else { return };
    let (Ok(mapping_text), row) = (std::str::from_utf8(&input[..split]), &input[split + 1..]) else { return };
    let Ok(mapping) = Mapping::from_toml(mapping_text) else { return };
    let Ok(Value::Object(row)) = serde_json::from_slice::<Value>(row) else { return };
    let _ = mapping.columns();
    if let Ok(message) = mapping.message_for(&source(), &row) {
        normalize_mapped(message);
    }
});
