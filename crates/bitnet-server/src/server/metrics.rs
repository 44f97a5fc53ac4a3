//! Prometheus metrics with vLLM's names under a `bitnet_` prefix, kept in
//! atomics and rendered by hand in the text exposition format.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use bitnet_inference::{FallbackReason, GpuHealth};

/// Latency buckets in seconds, from 1 ms to 5 minutes.
const LATENCY_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];

/// Fallback-cost buckets in seconds, from 0.1 ms (a decision) to 10 s.
const FALLBACK_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Batch-size buckets (entries per step).
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// A cumulative histogram with fixed bucket bounds.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// One count per bound, plus the `+Inf` bucket; not cumulative.
    counts: Vec<AtomicU64>,
    count: AtomicU64,
    /// The sum of observations, as `f64` bits.
    sum_bits: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_bits: AtomicU64::new(0f64.to_bits()),
        }
    }

    pub fn observe(&self, value: f64) {
        let value = if value.is_finite() { value.max(0.0) } else { 0.0 };
        let bucket = self.bounds.iter().position(|&b| value <= b).unwrap_or(self.bounds.len());
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        let _ = self
            .sum_bits
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| Some((f64::from_bits(bits) + value).to_bits()));
    }

    pub fn observe_duration(&self, duration: Duration) {
        self.observe(duration.as_secs_f64());
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            cumulative += count.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        cumulative += self.counts[self.bounds.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let _ = writeln!(out, "{name}_sum {}", f64::from_bits(self.sum_bits.load(Ordering::Relaxed)));
        let _ = writeln!(out, "{name}_count {}", self.count());
    }
}

/// A counter with one label.
#[derive(Debug)]
pub struct LabeledCounter {
    label: &'static str,
    values: Mutex<BTreeMap<&'static str, u64>>,
}

impl LabeledCounter {
    fn new(label: &'static str, initial: &[&'static str]) -> Self {
        Self { label, values: Mutex::new(initial.iter().map(|&v| (v, 0)).collect()) }
    }

    pub fn inc(&self, value: &'static str) {
        *self.values.lock().unwrap_or_else(|e| e.into_inner()).entry(value).or_insert(0) += 1;
    }

    pub fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        self.values.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (value, count) in self.snapshot() {
            let _ = writeln!(out, "{name}{{{}=\"{value}\"}} {count}", self.label);
        }
    }
}

/// Every metric the server exports.
#[derive(Debug)]
pub struct Metrics {
    pub num_requests_running: AtomicU64,
    pub num_requests_waiting: AtomicU64,
    /// Generation requests accepted by a handler and not answered yet
    /// (what `--max-in-flight` bounds).
    pub num_requests_in_flight: AtomicU64,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub e2e_request_latency: Histogram,
    pub request_queue_time: Histogram,
    pub batch_size: Histogram,
    pub prompt_tokens_total: AtomicU64,
    /// Prompt tokens whose KV cache was copied from the prefix cache.
    pub prompt_tokens_cached_total: AtomicU64,
    /// The prefix cache's hits, evictions and held positions (from the engine).
    pub prefix_cache_hits_total: AtomicU64,
    pub prefix_cache_evictions_total: AtomicU64,
    pub prefix_cache_tokens: AtomicU64,
    pub generation_tokens_total: AtomicU64,
    pub requests_cancelled_total: AtomicU64,
    pub requests_failed_total: AtomicU64,
    pub requests_rejected: LabeledCounter,
    /// Requests served on the CPU although they wanted the GPU, by reason.
    pub fallbacks: LabeledCounter,
    /// What each fallback cost (`SequenceReport`'s fallback cost).
    pub fallback_latency: Histogram,
    /// The GPU's [`GpuHealth`], as its index in `GpuHealth::ALL`.
    pub gpu_health: AtomicU64,
    pub request_success: LabeledCounter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            num_requests_running: AtomicU64::new(0),
            num_requests_waiting: AtomicU64::new(0),
            num_requests_in_flight: AtomicU64::new(0),
            time_to_first_token: Histogram::new(LATENCY_BUCKETS),
            inter_token_latency: Histogram::new(LATENCY_BUCKETS),
            e2e_request_latency: Histogram::new(LATENCY_BUCKETS),
            request_queue_time: Histogram::new(LATENCY_BUCKETS),
            batch_size: Histogram::new(BATCH_BUCKETS),
            prompt_tokens_total: AtomicU64::new(0),
            prompt_tokens_cached_total: AtomicU64::new(0),
            prefix_cache_hits_total: AtomicU64::new(0),
            prefix_cache_evictions_total: AtomicU64::new(0),
            prefix_cache_tokens: AtomicU64::new(0),
            generation_tokens_total: AtomicU64::new(0),
            requests_cancelled_total: AtomicU64::new(0),
            requests_failed_total: AtomicU64::new(0),
            requests_rejected: LabeledCounter::new("reason", &[]),
            // Every reason exists from the start, at 0.
            fallbacks: LabeledCounter::new(
                "reason",
                &FallbackReason::ALL.iter().map(|r| r.as_str()).collect::<Vec<_>>(),
            ),
            fallback_latency: Histogram::new(FALLBACK_BUCKETS),
            gpu_health: AtomicU64::new(0),
            request_success: LabeledCounter::new("finish_reason", &["length", "stop"]),
        }
    }
}

impl Metrics {
    pub fn set_gpu_health(&self, health: GpuHealth) {
        let index = GpuHealth::ALL.iter().position(|&h| h == health).unwrap_or(0);
        self.gpu_health.store(index as u64, Ordering::Relaxed);
    }

    pub fn gpu_health(&self) -> GpuHealth {
        let index = self.gpu_health.load(Ordering::Relaxed) as usize;
        GpuHealth::ALL.get(index).copied().unwrap_or(GpuHealth::Absent)
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8192);
        let gauge = |out: &mut String, name: &str, help: &str, value: &AtomicU64| {
            let _ =
                writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}", value.load(Ordering::Relaxed));
        };
        let counter = |out: &mut String, name: &str, help: &str, value: &AtomicU64| {
            let _ =
                writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", value.load(Ordering::Relaxed));
        };
        gauge(&mut out, "bitnet_num_requests_running", "Requests in the running batch.", &self.num_requests_running);
        gauge(&mut out, "bitnet_num_requests_waiting", "Requests waiting for admission.", &self.num_requests_waiting);
        gauge(
            &mut out,
            "bitnet_num_requests_in_flight",
            "Generation requests accepted and not yet answered.",
            &self.num_requests_in_flight,
        );
        self.time_to_first_token.render(
            &mut out,
            "bitnet_time_to_first_token_seconds",
            "Time from arrival to the first generated token.",
        );
        self.inter_token_latency.render(
            &mut out,
            "bitnet_inter_token_latency_seconds",
            "Time between consecutive generated tokens of one request.",
        );
        self.e2e_request_latency.render(
            &mut out,
            "bitnet_e2e_request_latency_seconds",
            "Time from arrival to the last token of finished requests.",
        );
        self.request_queue_time.render(
            &mut out,
            "bitnet_request_queue_time_seconds",
            "Time from arrival to admission into the running batch.",
        );
        self.batch_size.render(&mut out, "bitnet_batch_size", "Sequences per engine step.");
        counter(&mut out, "bitnet_prompt_tokens_total", "Prompt tokens processed.", &self.prompt_tokens_total);
        counter(
            &mut out,
            "bitnet_prompt_tokens_cached_total",
            "Prompt tokens taken from the prefix cache instead of processed.",
            &self.prompt_tokens_cached_total,
        );
        counter(
            &mut out,
            "bitnet_prefix_cache_hits_total",
            "Requests that started from a prefix-cache entry.",
            &self.prefix_cache_hits_total,
        );
        counter(
            &mut out,
            "bitnet_prefix_cache_evictions_total",
            "Prefix-cache entries evicted (budget, or room for a new sequence on the GPU).",
            &self.prefix_cache_evictions_total,
        );
        gauge(
            &mut out,
            "bitnet_prefix_cache_tokens",
            "KV positions the prefix cache holds.",
            &self.prefix_cache_tokens,
        );
        counter(&mut out, "bitnet_generation_tokens_total", "Tokens generated.", &self.generation_tokens_total);
        counter(
            &mut out,
            "bitnet_requests_cancelled_total",
            "Requests whose client went away before they finished.",
            &self.requests_cancelled_total,
        );
        counter(
            &mut out,
            "bitnet_requests_failed_total",
            "Requests that failed inside the engine (answered 500).",
            &self.requests_failed_total,
        );
        self.requests_rejected.render(&mut out, "bitnet_requests_rejected_total", "Requests answered with an error.");
        self.fallbacks.render(
            &mut out,
            "bitnet_fallbacks_total",
            "Requests served on the CPU although they wanted the GPU, by reason.",
        );
        self.fallback_latency.render(
            &mut out,
            "bitnet_fallback_latency_seconds",
            "Time a fallback added to its request (deciding, or the failed GPU attempt plus the CPU re-prefill).",
        );
        let current = self.gpu_health();
        let _ = writeln!(
            out,
            "# HELP bitnet_gpu_health GPU state: 1 for the current one (absent, healthy, cooling_down, recovering).\n# TYPE bitnet_gpu_health gauge"
        );
        for health in GpuHealth::ALL {
            let _ = writeln!(out, "bitnet_gpu_health{{state=\"{}\"}} {}", health.as_str(), u8::from(health == current));
        }
        self.request_success.render(&mut out, "bitnet_request_success_total", "Requests finished successfully.");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::new(&[1.0, 2.0]);
        for v in [0.5, 1.5, 1.5, 9.0] {
            h.observe(v);
        }
        let mut out = String::new();
        h.render(&mut out, "x", "help");
        assert!(out.contains("x_bucket{le=\"1\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"2\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 4\n"), "{out}");
        assert!(out.contains("x_sum 12.5\n"), "{out}");
        assert!(out.contains("x_count 4\n"), "{out}");
    }
}
