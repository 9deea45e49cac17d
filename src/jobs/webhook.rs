//! Job webhooks: the final job object POSTed to the job's `webhook_url`, signed so receivers
//! can check it came from us: header `webhook-signature: t=<unix seconds>,v1=<hex>` where
//! `<hex>` is HMAC-SHA256(secret, "<t>.<body>"). Retried with exponential backoff.

use super::fetch::FetchConfig;
use super::types::JobRecord;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use std::time::Duration;

pub fn sign(secret: &str, timestamp: u64, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes())
        .expect("HMAC takes any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// Checks a `webhook-signature` header value (for receivers and tests).
pub fn verify(secret: &str, header: &str, body: &[u8]) -> bool {
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", x)) => t = x.parse::<u64>().ok(),
            Some(("v1", x)) => v1 = Some(x.to_string()),
            _ => {}
        }
    }
    match (t, v1) {
        (Some(t), Some(v)) => sign(secret, t, body) == v,
        _ => false,
    }
}

pub fn deliver_in_background(
    url: String,
    secret: String,
    job: &JobRecord,
    retries: usize,
    fetch: FetchConfig,
) {
    let body = serde_json::to_vec(job).unwrap_or_default();
    let job_id = job.id.clone();
    std::thread::spawn(move || {
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(10))
            .build();
        let mut delay = Duration::from_millis(500);
        for attempt in 0..=retries {
            // The same private-network policy as dataset downloads.
            if !fetch.allow_private_networks {
                if let Some(host) = url.split("://").nth(1).and_then(|r| r.split('/').next()) {
                    let with_port = if host.contains(':') {
                        host.to_string()
                    } else {
                        format!("{host}:80")
                    };
                    let private = std::net::ToSocketAddrs::to_socket_addrs(&with_port)
                        .map(|mut a| a.any(|a| super::fetch::is_private(&a.ip())))
                        .unwrap_or(false);
                    if private {
                        tracing::warn!(job = %job_id, "webhook {url} resolves to a private address; not sent");
                        return;
                    }
                }
            }
            let ts = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let sig = format!("t={ts},v1={}", sign(&secret, ts, &body));
            match agent
                .post(&url)
                .set("content-type", "application/json")
                .set("webhook-signature", &sig)
                .send_bytes(&body)
            {
                Ok(_) => {
                    tracing::info!(job = %job_id, attempt, "webhook delivered");
                    return;
                }
                Err(e) => tracing::warn!(job = %job_id, attempt, "webhook failed: {e}"),
            }
            std::thread::sleep(delay);
            delay *= 2;
        }
    });
}
