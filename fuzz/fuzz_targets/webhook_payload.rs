//! Webhook deliveries: the first byte picks the format (a generic webhook
//! gets a fixed mapping), the rest is the payload. Never a panic, and every
//! accepted message reads back from the log.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use tandem_core::mapping::Mapping;
use tandem_core::webhook::{messages_for, WebhookFormat, WebhookSettings};
use tandem_fuzz::{normalize_mapped, source};

const GENERIC_MAPPING: &str = r#"
event = "Form Submitted"
row_key = "id"
timestamp = "at"
[identifiers]
email = "contact.email"
user_id = "user"
[properties]
form = "form"
score = { column = "score", type = "number" }
"#;

fuzz_target!(|input: &[u8]| {
    let Some((selector, payload)) = input.split_first() else { return };
    let format = WebhookFormat::ALL[usize::from(*selector) % WebhookFormat::ALL.len()];
    let mapping = (format == WebhookFormat::Generic).then(|| Mapping::from_toml(GENERIC_MAPPING).expect("a valid mapping"));
    let settings = WebhookSettings { format, secret: None, verify_token: None, mapping };
    let Ok(payload) = serde_json::from_slice::<Value>(payload) else { return };
    if let Ok(messages) = messages_for(&settings, &source(), &payload) {
        messages.into_iter().flatten().for_each(normalize_mapped);
    }
});
