//! `notify` webhooks: a POST of the job's summary, from the outbox the planner fills, retried
//! with exponential back-off and jitter; every try is recorded and audited.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::State;
use crate::store::now_ms;
use crate::store::planner::{Delivery, Notification};

/// How long one POST may take.
const TIMEOUT: Duration = Duration::from_secs(10);
/// How long a claim on a webhook lasts (a coordinator that dies mid-try loses it).
const CLAIM_MS: i64 = 30_000;
/// Longest wait between tries.
const MAX_BACKOFF_MS: u64 = 5 * 60 * 1000;

pub async fn run(state: Arc<State>, mut shutdown: watch::Receiver<bool>) {
    let ca = state.config.ca_cert.as_ref().and_then(|path| {
        fleetbox_review::llm::ca_certificate(path)
            .map_err(|e| tracing::error!(error = %e, "`--ca-cert` not usable for webhooks"))
            .ok()
    });
    loop {
        let now = now_ms();
        match state
            .store
            .claim_notifications(&state.instance, now, now + CLAIM_MS, 16)
            .await
        {
            Ok(due) => {
                for n in due {
                    let outcome = deliver(ca.as_ref(), &n, &state.config.planner).await;
                    match &outcome {
                        Delivery::Delivered { status } => {
                            tracing::info!(job_id = %n.job_id, url = %n.url, status, "webhook delivered")
                        }
                        Delivery::Retry { error, .. } => {
                            tracing::warn!(job_id = %n.job_id, url = %n.url, %error, "webhook failed; it will be tried again")
                        }
                        Delivery::Failed { error } => {
                            tracing::error!(job_id = %n.job_id, url = %n.url, %error, "webhook failed for the last time")
                        }
                    }
                    match state
                        .store
                        .record_delivery(&n, &state.instance, &outcome)
                        .await
                    {
                        Ok(true) => {
                            if let Delivery::Failed { error } = &outcome {
                                let details = serde_json::json!({
                                    "rule": n.rule, "url": n.url, "tries": n.tries + 1, "error": error,
                                });
                                if let Err(e) = state
                                    .store
                                    .add_flag(
                                        &n.tenant_id,
                                        &n.job_id,
                                        fleetbox_proto::FlagKind::NotifyFailed,
                                        &details,
                                    )
                                    .await
                                {
                                    tracing::error!(error = %e, "could not flag a failed webhook");
                                }
                            }
                        }
                        Ok(false) => {}
                        Err(e) => tracing::error!(error = %e, "could not record a webhook try"),
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "finding due webhooks"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = state.notify_wake.notified() => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// An HTTP client that connects `host` only to `addr` (the address the guard checked) and
/// follows no redirect.
fn client_for(
    ca: Option<&reqwest::Certificate>,
    host: &str,
    addr: std::net::SocketAddr,
) -> Result<reqwest::Client, reqwest::Error> {
    let mut builder = reqwest::Client::builder()
        .timeout(TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("fleetbox/", env!("CARGO_PKG_VERSION")))
        .resolve(host, addr);
    if let Some(cert) = ca {
        builder = builder.add_root_certificate(cert.clone());
    }
    builder.build()
}

async fn deliver(
    ca: Option<&reqwest::Certificate>,
    n: &Notification,
    config: &super::PlannerConfig,
) -> Delivery {
    // Where it may go is decided before anything is sent; a refusal is final.
    let url = match reqwest::Url::parse(&n.url) {
        Ok(url) => url,
        Err(e) => {
            return Delivery::Failed {
                error: format!("not a URL: {e}"),
            };
        }
    };
    let addr = match super::guard::vet(&url, &config.notify_allow).await {
        Ok(addr) => addr,
        Err(e @ super::guard::VetError::Refused { .. }) => {
            return Delivery::Failed {
                error: e.to_string(),
            };
        }
        Err(e) => return retry_or_fail(n, config, e.to_string()),
    };
    let client = match client_for(ca, url.host_str().unwrap_or_default(), addr) {
        Ok(client) => client,
        Err(e) => return retry_or_fail(n, config, format!("no HTTP client: {e}")),
    };
    let sent = client
        .post(url)
        .header("content-type", "application/json")
        // Lets the receiver drop a repeat (a try whose answer was lost is sent again).
        .header("x-fleetbox-notification", &n.id)
        .body(n.body.clone())
        .send()
        .await;
    let error = match sent {
        Ok(r) if r.status().is_success() => {
            return Delivery::Delivered {
                status: r.status().as_u16(),
            };
        }
        Ok(r) => format!("HTTP {}", r.status()),
        Err(e) => {
            let mut why = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                why.push_str(&format!(": {s}"));
                source = s.source();
            }
            why
        }
    };
    retry_or_fail(n, config, error)
}

/// A failed try: another later, or failed for good after `notify_tries`.
fn retry_or_fail(n: &Notification, config: &super::PlannerConfig, error: String) -> Delivery {
    let tries = n.tries as u32 + 1;
    if tries >= config.notify_tries {
        return Delivery::Failed { error };
    }
    Delivery::Retry {
        error,
        next_at: now_ms() + backoff(config.notify_backoff_ms, tries) as i64,
    }
}

/// `base · 2^(tries-1)`, capped, times a random factor in [0.5, 1.5).
fn backoff(base: u64, tries: u32) -> u64 {
    let plain = base
        .saturating_mul(1u64 << tries.saturating_sub(1).min(20))
        .min(MAX_BACKOFF_MS);
    let mut b = [0u8; 2];
    let _ = getrandom::fill(&mut b);
    let jitter = 0.5 + f64::from(u16::from_le_bytes(b)) / 65536.0;
    (plain as f64 * jitter) as u64
}

#[cfg(test)]
mod tests {
    #[test]
    fn back_off_doubles_within_its_jitter_and_is_capped() {
        for tries in 1..6 {
            let plain = 1000u64 << (tries - 1);
            let b = super::backoff(1000, tries);
            assert!(b >= plain / 2 && b < plain * 3 / 2, "{tries}: {b}");
        }
        assert!(super::backoff(1000, 40) < super::MAX_BACKOFF_MS * 3 / 2);
    }
}
