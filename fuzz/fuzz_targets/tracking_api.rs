//! The tracking API's parser on arbitrary bodies, as a batch and as a single
//! call: never a panic, and every accepted event reads back from the log.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem_core::collect::{
    normalize_batch, normalize_message, parse_batch, parse_single, replace_lone_surrogates, BatchDefaults,
    IdRequirement, RequestContext,
};
use tandem_core::EventType;
use tandem_fuzz::{assert_readable, received_at, source};

fuzz_target!(|body: &[u8]| {
    let repaired = replace_lone_surrogates(body);
    assert_eq!(repaired.len(), body.len(), "the repair keeps the body's length");
    let source = source();
    let request = RequestContext {
        source_id: &source,
        received_at: received_at(),
        client_ip: Some("192.0.2.1"),
        ids: IdRequirement::UserOrAnonymousId,
    };
    if let Ok(batch) = parse_batch(&repaired) {
        let normalized = normalize_batch(&batch, &request);
        assert_eq!(normalized.events.len() + normalized.rejected.len(), batch.messages.len());
        normalized.events.iter().for_each(assert_readable);
    }
    if let Ok((message, _write_key)) = parse_single(&repaired) {
        if let Ok(event) = normalize_message(message, Some(EventType::Track), &BatchDefaults::default(), &request) {
            assert_readable(&event);
        }
    }
});
