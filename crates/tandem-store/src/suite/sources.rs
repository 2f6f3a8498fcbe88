//! What every backend's [`Sources`](crate::Sources) must do.

use super::{batch, record};
use crate::{Store, StoreError};
use tandem_core::{EventType, SourceId, SourceKind, WriteKey};

pub fn sources_have_unique_names_and_write_keys(store: &impl Store) {
    let web = store.create_source("website", SourceKind::Website).unwrap();
    let app = store.create_source(" app ", SourceKind::App).unwrap();
    assert_eq!(app.name, "app", "names are trimmed");
    assert_ne!(web.id, app.id);
    assert_ne!(web.write_key, app.write_key);
    assert!(web.write_key.as_str().len() >= 32, "write keys are long enough to be secret");
    assert_eq!(store.list_sources().unwrap(), vec![web.clone(), app.clone()]);
    assert_eq!(store.source_by_write_key(&web.write_key).unwrap(), Some(web.clone()));
    assert_eq!(store.source_by_write_key(&WriteKey::new("nope")).unwrap(), None);
    assert_eq!(store.source_by_name("app").unwrap(), app);
    assert!(matches!(store.source_by_name("crm"), Err(StoreError::SourceNotFound(_))));
    assert!(matches!(store.create_source("website", SourceKind::Backend), Err(StoreError::SourceExists(_))));
    assert!(matches!(store.create_source("  ", SourceKind::Backend), Err(StoreError::InvalidSource(_))));
    assert_eq!(store.list_sources().unwrap().len(), 2);
}

pub fn tokens_verify_by_secret_only(store: &impl Store) {
    let (info, secret) = store.create_token("ops").unwrap();
    assert_eq!(info.name, "ops");
    assert!(secret.len() >= 40);
    assert_eq!(store.verify_token(&secret).unwrap(), Some(info.clone()));
    assert_eq!(store.verify_token("tdm_wrong").unwrap(), None);
    assert_eq!(store.verify_token(&info.id).unwrap(), None, "a token's id is not its secret");
}

pub fn webhook_settings_round_trip(store: &impl Store) {
    use tandem_core::webhook::{WebhookFormat, WebhookSettings};
    let leads = store.create_source("fb-leads", SourceKind::Webhook).unwrap();
    let plain = store.create_source("web", SourceKind::Website).unwrap();
    assert_eq!(store.webhook(&leads.id).unwrap(), None, "no settings yet");
    let settings = WebhookSettings {
        format: WebhookFormat::FacebookLeads,
        secret: Some("app-secret-123".into()),
        verify_token: Some("verify-me".into()),
        mapping: None,
    };
    assert_eq!(store.set_webhook("fb-leads", &settings).unwrap().id, leads.id);
    assert_eq!(store.webhook(&leads.id).unwrap(), Some((leads.clone(), settings)));
    assert_eq!(store.webhook(&plain.id).unwrap(), None);
    assert_eq!(store.webhook(&SourceId::new("src_nope")).unwrap(), None);
    assert!(matches!(
        store.set_webhook(
            "nope",
            &WebhookSettings { format: WebhookFormat::SocialMentions, secret: None, verify_token: None, mapping: None }
        ),
        Err(StoreError::SourceNotFound(_))
    ));
}

pub fn revoked_tokens_no_longer_verify(store: &impl Store) {
    let (ops, ops_secret) = store.create_token("ops").unwrap();
    let (demo, demo_secret) = store.create_token("demo").unwrap();
    let listed = store.list_tokens().unwrap();
    assert_eq!(listed.len(), 2);
    assert!(listed.contains(&ops) && listed.contains(&demo));
    assert_eq!(store.revoke_token(&demo.id).unwrap(), demo);
    assert_eq!(store.verify_token(&demo_secret).unwrap(), None);
    assert_eq!(store.verify_token(&ops_secret).unwrap(), Some(ops.clone()));
    assert_eq!(store.list_tokens().unwrap(), vec![ops]);
    assert!(matches!(store.revoke_token(&demo.id), Err(StoreError::TokenNotFound(_))));
}

pub fn sources_rename_rotate_and_delete_only_without_events(store: &impl Store) {
    let web = store.create_source("web", SourceKind::Website).unwrap();
    let spare = store.create_source("spare", SourceKind::Backend).unwrap();
    store.append(&[batch(vec![record(&web.id, "m1", EventType::Track, 1_000)])], 0).unwrap();
    let renamed = store.rename_source("web", "website").unwrap();
    assert_eq!(
        (renamed.id.clone(), renamed.name.as_str(), &renamed.write_key),
        (web.id.clone(), "website", &web.write_key)
    );
    assert!(matches!(store.source_by_name("web"), Err(StoreError::SourceNotFound(_))));
    assert!(matches!(store.rename_source("website", "spare"), Err(StoreError::SourceExists(_))));
    assert!(matches!(store.rename_source("website", "  "), Err(StoreError::InvalidSource(_))));

    let rotated = store.rotate_write_key("website").unwrap();
    assert_ne!(rotated.write_key, web.write_key);
    assert_eq!(store.source_by_write_key(&web.write_key).unwrap(), None, "the old key stops working");
    assert_eq!(store.source_by_write_key(&rotated.write_key).unwrap().map(|source| source.id), Some(web.id.clone()));

    assert!(matches!(store.delete_source("website"), Err(StoreError::SourceInUse { events: 1, .. })));
    assert_eq!(store.delete_source("spare").unwrap().id, spare.id);
    assert_eq!(store.list_sources().unwrap().len(), 1);
    assert!(matches!(store.delete_source("spare"), Err(StoreError::SourceNotFound(_))));
}

pub fn tokens_keep_their_role_expiry_and_last_use(store: &impl Store) {
    use tandem_core::govern::Role;
    let (old, _) = store.create_token("ops").unwrap();
    assert_eq!((old.role, old.expires_at_ms, old.last_used_at_ms), (Role::Admin, None, None));
    let (support, secret) = store.create_token_with("desk", Role::Support, Some(4_000_000_000_000)).unwrap();
    let found = store.verify_token(&secret).unwrap().unwrap();
    assert_eq!(found, support);
    assert_eq!(found.role, Role::Support);
    assert!(!found.is_expired(3_999_999_999_999));
    assert!(found.is_expired(4_000_000_000_000));
    store.touch_token(&support.id, 123_456).unwrap();
    store.touch_token("tok_unknown", 1).unwrap();
    let listed = store.list_tokens().unwrap();
    let desk = listed.iter().find(|token| token.id == support.id).unwrap();
    assert_eq!((desk.role, desk.last_used_at_ms), (Role::Support, Some(123_456)));
    assert_eq!(store.revoke_token(&support.id).unwrap().role, Role::Support);
    assert_eq!(store.verify_token(&secret).unwrap(), None);
}
