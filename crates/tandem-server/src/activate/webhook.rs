//! Sending to a webhook: one POST per batch, the body a JSON array of the
//! items, signed when the destination has a secret, over `http://` or
//! `https://` (rustls with the public web roots, or the certificate
//! authorities of the destination's `ca_file`). The answer is turned into
//! the delivery policy's terms ([`AttemptFailure`]), `Retry-After` included.

use std::time::Duration;

use tandem_core::activate::{AttemptFailure, FailureClass, WebhookSettings};

/// A webhook's answer to a request it accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Accepted {
    /// The 2xx status it answered.
    pub status: u16,
}

/// The HTTP client for one webhook: its timeout and the roots it trusts.
fn agent(webhook: &WebhookSettings) -> Result<ureq::Agent, AttemptFailure> {
    let mut config = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_millis(webhook.timeout_ms)))
        .http_status_as_error(false);
    if let Some(ca_file) = &webhook.ca_file {
        let pem = std::fs::read(ca_file)
            .map_err(|error| AttemptFailure::Connection(format!("cannot read ca_file {ca_file}: {error}")))?;
        let certificates: Vec<ureq::tls::Certificate<'static>> = ureq::tls::parse_pem(&pem)
            .filter_map(|item| match item {
                Ok(ureq::tls::PemItem::Certificate(certificate)) => Some(certificate),
                _ => None,
            })
            .collect();
        if certificates.is_empty() {
            return Err(AttemptFailure::Connection(format!("ca_file {ca_file} holds no PEM certificate")));
        }
        let tls = ureq::tls::TlsConfig::builder().root_certs(ureq::tls::RootCerts::new_with_certs(&certificates));
        config = config.tls_config(tls.build());
    }
    Ok(config.build().into())
}

/// POSTs `body` (a JSON array) to the webhook; `Ok` on a 2xx answer.
pub fn post(webhook: &WebhookSettings, body: &str) -> Result<Accepted, AttemptFailure> {
    let agent = agent(webhook)?;
    let mut request = agent.post(&webhook.url).header("content-type", "application/json");
    if let Some(secret) = &webhook.secret {
        request = request
            .header(&webhook.signature_header, tandem_core::activate::webhook_signature(secret, body.as_bytes()));
    }
    for (name, value) in &webhook.headers {
        request = request.header(name, value);
    }
    match request.send(body.as_bytes()) {
        Ok(response) if response.status().is_success() => Ok(Accepted { status: response.status().as_u16() }),
        Ok(response) => {
            let status = response.status().as_u16();
            let failure = AttemptFailure::Status(status);
            let asked =
                response.headers().get("retry-after").and_then(|value| value.to_str().ok()).and_then(|value| {
                    tandem_core::activate::retry_after_ms(value, chrono::Utc::now().timestamp_millis())
                });
            match asked {
                Some(after_ms) if failure.class() == FailureClass::Retryable => {
                    Err(AttemptFailure::RetryAfter { status, after_ms })
                }
                _ => Err(failure),
            }
        }
        Err(ureq::Error::Timeout(_)) => Err(AttemptFailure::Timeout),
        Err(error) => Err(AttemptFailure::Connection(error.to_string())),
    }
}
