//! Job webhooks in the Standard Webhooks format (<https://www.standardwebhooks.com>), so a
//! receiver can verify them with any of that project's libraries:
//!
//! - headers `webhook-id` (one id per event, the same on every retry), `webhook-timestamp`
//!   (unix seconds of this attempt) and `webhook-signature: v1,<base64 HMAC-SHA256>` over
//!   `"<id>.<timestamp>.<body>"`, keyed with the base64-decoded part of a `whsec_...` secret;
//! - body `{"type": "job.started" | "job.progress" | "job.completed", "timestamp": <RFC 3339>,
//!   "data": <the job object>}`.
//!
//! Deliveries run on the async runtime: each event is a task that retries with exponential
//! backoff and jitter (`backon`) while nothing waits on a thread between attempts. The HTTP call
//! itself goes through the same guarded agent as dataset downloads, whose resolver refuses
//! private addresses at connect time, so DNS cannot switch the target after a check.

use super::fetch::guarded_agent;
use super::types::{JobRecord, WebhookEvent};
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use std::time::Duration;

const SECRET_PREFIX: &str = "whsec_";

/// A webhook signing key: the bytes of a `whsec_<base64>` secret.
#[derive(Clone)]
pub struct WebhookSecret(Vec<u8>);

impl WebhookSecret {
    pub fn parse(secret: &str) -> Result<Self, String> {
        let how = "make one with: echo whsec_$(openssl rand -base64 32)";
        let b64 = secret
            .strip_prefix(SECRET_PREFIX)
            .ok_or_else(|| format!("a webhook secret starts with {SECRET_PREFIX} ({how})"))?;
        let key = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| format!("the part after {SECRET_PREFIX} is not base64: {e} ({how})"))?;
        if key.len() < 24 {
            return Err(format!(
                "a webhook secret needs at least 24 random bytes, this one has {} ({how})",
                key.len()
            ));
        }
        Ok(Self(key))
    }

    /// `v1,<base64 HMAC-SHA256(key, "<id>.<timestamp>.<body>")>`.
    pub fn sign(&self, msg_id: &str, timestamp: u64, body: &[u8]) -> String {
        let mut mac =
            <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(format!("{msg_id}.{timestamp}.").as_bytes());
        mac.update(body);
        format!(
            "v1,{}",
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
        )
    }

    /// Whether a `webhook-signature` header (space-separated `v1,<sig>` entries) holds this
    /// message's signature.
    pub fn verify(&self, msg_id: &str, timestamp: u64, body: &[u8], header: &str) -> bool {
        use subtle::ConstantTimeEq;
        let expected = self.sign(msg_id, timestamp, body);
        header
            .split_whitespace()
            .any(|s| bool::from(s.as_bytes().ct_eq(expected.as_bytes())))
    }
}

struct Delivery {
    url: String,
    msg_id: String,
    body: Vec<u8>,
    job_id: String,
}

/// Queues deliveries for a background task on the async runtime.
pub struct Dispatcher {
    tx: tokio::sync::mpsc::UnboundedSender<Delivery>,
}

impl Dispatcher {
    /// Starts the delivery task: on the current Tokio runtime when there is one (the server),
    /// else on a small runtime of its own.
    pub fn start(secret: WebhookSecret, retries: usize, allow_private: bool) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Delivery>();
        let agent = guarded_agent(allow_private, Duration::from_secs(10));
        let run = async move {
            while let Some(d) = rx.recv().await {
                tokio::spawn(deliver(agent.clone(), secret.clone(), d, retries));
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn(run);
            }
            Err(_) => {
                std::thread::Builder::new()
                    .name("webhooks".into())
                    .spawn(move || {
                        match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                            Ok(rt) => rt.block_on(run),
                            Err(e) => tracing::error!("webhook runtime: {e}"),
                        }
                    })
                    .expect("spawning the webhook thread");
            }
        }
        Self { tx }
    }

    /// Sends `event` about `job` to `url` (in the background; failures are logged).
    pub fn send(&self, url: &str, event: WebhookEvent, job: &JobRecord) {
        let body = serde_json::json!({
            "type": type_name(event),
            "timestamp": rfc3339_now(),
            "data": job,
        });
        let _ = self.tx.send(Delivery {
            url: url.to_string(),
            msg_id: format!("msg_{}", uuid::Uuid::new_v4().simple()),
            body: serde_json::to_vec(&body).unwrap_or_default(),
            job_id: job.id.clone(),
        });
    }
}

/// The event's `type` in the body.
fn type_name(event: WebhookEvent) -> &'static str {
    match event {
        WebhookEvent::Start => "job.started",
        WebhookEvent::Progress => "job.progress",
        WebhookEvent::Completed => "job.completed",
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn rfc3339_now() -> String {
    // Civil date from days since the epoch (Howard Hinnant's algorithm), to avoid a date crate
    // for one timestamp.
    let secs = unix_now();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

async fn deliver(agent: ureq::Agent, secret: WebhookSecret, d: Delivery, retries: usize) {
    use backon::{ExponentialBuilder, Retryable};
    let attempt = || {
        let (agent, secret) = (agent.clone(), secret.clone());
        let (url, id, body) = (d.url.clone(), d.msg_id.clone(), d.body.clone());
        async move {
            // Signed per attempt: receivers refuse timestamps more than a few minutes old.
            let ts = unix_now();
            let sig = secret.sign(&id, ts, &body);
            tokio::task::spawn_blocking(move || {
                agent
                    .post(&url)
                    .set("content-type", "application/json")
                    .set("webhook-id", &id)
                    .set("webhook-timestamp", &ts.to_string())
                    .set("webhook-signature", &sig)
                    .send_bytes(&body)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            })
            .await
            .map_err(|e| e.to_string())?
        }
    };
    let backoff = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(500))
        .with_max_delay(Duration::from_secs(60))
        .with_max_times(retries)
        .with_jitter();
    let result = attempt
        .retry(backoff)
        .sleep(tokio::time::sleep)
        .notify(|e: &String, wait: Duration| {
            tracing::warn!(job = %d.job_id, url = %d.url, "webhook failed ({e}); retrying in {wait:?}");
        })
        .await;
    match result {
        Ok(()) => tracing::info!(job = %d.job_id, id = %d.msg_id, "webhook delivered"),
        Err(e) => tracing::error!(job = %d.job_id, url = %d.url, "webhook given up after {retries} retries: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_must_be_whsec_base64_of_enough_bytes() {
        assert!(WebhookSecret::parse("s3cret").is_err());
        assert!(WebhookSecret::parse("whsec_not base64!").is_err());
        assert!(WebhookSecret::parse("whsec_c2hvcnQ=").is_err());
        let s = WebhookSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let sig = s.sign("msg_1", 1_700_000_000, b"{}");
        assert!(sig.starts_with("v1,"));
        assert!(s.verify("msg_1", 1_700_000_000, b"{}", &format!("v1,bogus {sig}")));
        assert!(!s.verify("msg_2", 1_700_000_000, b"{}", &sig));
        assert!(!s.verify("msg_1", 1_700_000_001, b"{}", &sig));
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let t = rfc3339_now();
        assert_eq!(t.len(), 20, "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z') && &t[10..11] == "T", "{t}");
    }
}
