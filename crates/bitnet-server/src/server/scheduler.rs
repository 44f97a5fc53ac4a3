//! The continuous-batching scheduler: one loop over the fallback [`Engine`]
//! on its own OS thread (backends are blocking compute), fed through a
//! channel.
//!
//! Each iteration drops requests whose client went away, then builds one
//! batch under a token budget (`max_batch_tokens`) and a cap on running
//! sequences (`max_batch_size`): first one decode token for every running
//! sequence, then prompt chunks of sequences still in prefill, then new
//! requests admitted first come, first served. KV space for prompt plus
//! `max_tokens` is reserved at admission (on the device the engine places
//! the request on) and freed when the request ends. The engine answers each
//! entry of a step on its own: GPU failures are re-run on the CPU inside it,
//! and a bad entry fails alone.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bitnet_inference::{
    Engine, EngineEvent, FallbackReason, GpuHealth, RequestPreferences, Sampler, SamplingConfig, SeqId, SequenceReport,
    StepInput, StepOutput, StepWant,
};
use bitnet_models::Tokenizer;
use tokio::sync::mpsc::UnboundedSender;

use super::metrics::Metrics;
use super::text::{OutputText, TextUpdate};

/// Limits of the batcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Most sequences in one step (running sequences).
    pub max_batch_size: usize,
    /// Most tokens (decode tokens plus prompt chunks) in one step.
    pub max_batch_tokens: usize,
}

/// One generation request, validated and tokenized.
#[derive(Debug)]
pub struct Job {
    pub prompt: Vec<u32>,
    /// At least 1; `prompt.len() + max_tokens` fits the context.
    pub max_tokens: usize,
    pub sampling: SamplingConfig,
    pub stop: Vec<String>,
    pub preferences: RequestPreferences,
    /// Nothing of the output is shown before the end (not streamed): when
    /// the request moves off the GPU mid-run, it is regenerated from the
    /// prompt on the CPU, so its output equals a CPU-only run's.
    pub replay_on_fallback: bool,
    pub arrived: Instant,
    /// Where the engine reports; a closed channel means the client left.
    pub events: UnboundedSender<Event>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

/// How a request ran, for its `bitnet` object.
#[derive(Debug, Clone, PartialEq)]
pub struct RunStats {
    /// The first engine step the request took part in.
    pub batch_id: u64,
    /// The largest step (in sequences) the request took part in.
    pub batch_size: usize,
    pub queue: Duration,
    pub compute: Duration,
    /// Device, precision, quantization and fallback, from the engine.
    pub report: SequenceReport,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    /// The whole output text (stop string trimmed).
    pub text: String,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    /// Prompt tokens whose KV cache came from the prefix cache.
    pub cached_tokens: usize,
    pub completion_tokens: usize,
    pub stats: RunStats,
}

/// What the engine tells a request's handler.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// New output text, in order; their concatenation is the final text.
    Delta(String),
    Done(Finished),
    /// The request failed inside the engine; the detail is for the log.
    Failed(String),
}

/// Starts the engine thread. It runs until every sender of the returned
/// channel is dropped and all accepted jobs are finished.
pub fn spawn(
    engine: Engine,
    tokenizer: Arc<Tokenizer>,
    config: SchedulerConfig,
    metrics: Arc<Metrics>,
) -> std::io::Result<(Sender<Job>, std::thread::JoinHandle<()>)> {
    let (tx, rx) = std::sync::mpsc::channel();
    let mut scheduler = Scheduler {
        engine,
        tokenizer,
        config,
        metrics,
        waiting: VecDeque::new(),
        running: Vec::new(),
        next_seq: 0,
        next_batch_id: 0,
        rotation: 0,
    };
    scheduler.publish_engine_events();
    let handle = std::thread::Builder::new().name("bitnet-engine".into()).spawn(move || scheduler.run(rx))?;
    Ok((tx, handle))
}

/// How often an idle engine thread looks at a GPU that is cooling down or
/// recovering, so that it comes back (and the health gauge moves) without
/// waiting for a request.
const HEALTH_POLL: Duration = Duration::from_millis(100);

struct Running {
    seq: SeqId,
    job: Job,
    sampler: Sampler,
    /// Prompt tokens already run (or copied from the prefix cache).
    prefilled: usize,
    /// Prompt tokens copied from the prefix cache at admission.
    cached: usize,
    generated: Vec<u32>,
    output: OutputText,
    admitted: Instant,
    last_token_at: Option<Instant>,
    first_batch_id: Option<u64>,
    largest_batch: usize,
    /// Set when the request has ended and its sequence must be removed.
    done: bool,
}

impl Running {
    fn in_prefill(&self) -> bool {
        self.prefilled < self.job.prompt.len()
    }
}

/// One entry of a planned step: the running index and what it feeds.
#[derive(Debug, Clone, Copy)]
enum Work {
    Decode,
    Prefill { len: usize },
}

struct Scheduler {
    engine: Engine,
    tokenizer: Arc<Tokenizer>,
    config: SchedulerConfig,
    metrics: Arc<Metrics>,
    waiting: VecDeque<Job>,
    running: Vec<Running>,
    next_seq: SeqId,
    next_batch_id: u64,
    /// Where the decode pass starts, so that a token budget smaller than the
    /// running set does not starve the same sequences every step.
    rotation: usize,
}

impl Scheduler {
    fn run(mut self, rx: Receiver<Job>) {
        loop {
            while self.running.is_empty() && self.waiting.is_empty() {
                self.publish_gauges();
                let job = match self.engine.health() {
                    GpuHealth::CoolingDown | GpuHealth::Recovering => rx.recv_timeout(HEALTH_POLL),
                    _ => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
                };
                match job {
                    Ok(job) => self.waiting.push_back(job),
                    Err(RecvTimeoutError::Timeout) => {
                        self.engine.poll_health();
                        self.publish_engine_events();
                    }
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
            while let Ok(job) = rx.try_recv() {
                self.waiting.push_back(job);
            }
            self.drop_cancelled();
            self.step();
            self.running.retain(|r| !r.done);
            self.publish_engine_events();
            self.publish_gauges();
        }
    }

    /// Turns the engine's fallbacks and health changes into metrics and log
    /// lines; returns the sequences that a GPU failure moved to the CPU.
    fn publish_engine_events(&mut self) -> HashSet<SeqId> {
        let mut moved = HashSet::new();
        for event in self.engine.take_events() {
            match event {
                EngineEvent::Fallback { seq, reason, cost } => {
                    self.metrics.fallbacks.inc(reason.as_str());
                    self.metrics.fallback_latency.observe_duration(cost);
                    if matches!(reason, FallbackReason::CudaError | FallbackReason::OutOfMemory) {
                        moved.insert(seq);
                    }
                }
                EngineEvent::Health { health, detail } => eprintln!("bitnet serve: GPU {}: {detail}", health.as_str()),
            }
        }
        self.metrics.set_gpu_health(self.engine.health());
        moved
    }

    fn publish_gauges(&self) {
        self.metrics.num_requests_running.store(self.running.len() as u64, Ordering::Relaxed);
        self.metrics.num_requests_waiting.store(self.waiting.len() as u64, Ordering::Relaxed);
        let cache = self.engine.prefix_cache_stats();
        self.metrics.prefix_cache_hits_total.store(cache.hits, Ordering::Relaxed);
        self.metrics.prefix_cache_evictions_total.store(cache.evictions, Ordering::Relaxed);
        self.metrics.prefix_cache_tokens.store(cache.tokens as u64, Ordering::Relaxed);
    }

    /// Frees the requests whose handler is gone (client disconnected or timed out).
    fn drop_cancelled(&mut self) {
        let before = self.waiting.len();
        self.waiting.retain(|job| !job.events.is_closed());
        self.metrics.requests_cancelled_total.fetch_add((before - self.waiting.len()) as u64, Ordering::Relaxed);
        for idx in 0..self.running.len() {
            self.cancel_if_abandoned(idx);
        }
        self.running.retain(|r| !r.done);
    }

    /// Ends a running request whose handler is gone; says whether it did.
    /// A request is checked again after every step, so one whose client
    /// left while the step ran is counted as cancelled, never as a success
    /// (a stop token sampled in that step would otherwise finish it).
    fn cancel_if_abandoned(&mut self, idx: usize) -> bool {
        let r = &mut self.running[idx];
        if r.done || !r.job.events.is_closed() {
            return false;
        }
        self.engine.remove_sequence(r.seq);
        r.done = true;
        self.metrics.requests_cancelled_total.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Plans and runs one batched step, then samples and reports.
    fn step(&mut self) {
        let plan = self.plan();
        if plan.is_empty() {
            return;
        }
        let batch_id = self.next_batch_id;
        self.next_batch_id += 1;
        // Each entry asks for the token it will use: sampled requests at
        // their last prompt chunk and decodes for their draw (made on the
        // GPU where it can), the rest for the greedy token (computed on the
        // GPU), so logits are never copied off the device for the host.
        let wants: Vec<StepWant> = plan
            .iter()
            .map(|&(idx, work)| {
                let r = &mut self.running[idx];
                let samples = match work {
                    Work::Decode => true,
                    Work::Prefill { len } => r.prefilled + len >= r.job.prompt.len(),
                };
                if samples && !r.sampler.config().is_greedy() {
                    StepWant::Sample(r.sampler.next_draw())
                } else {
                    StepWant::Greedy
                }
            })
            .collect();
        let inputs: Vec<StepInput<'_>> = plan
            .iter()
            .map(|&(idx, work)| {
                let r = &self.running[idx];
                let tokens = match work {
                    Work::Decode => &r.generated[r.generated.len() - 1..],
                    Work::Prefill { len } => &r.job.prompt[r.prefilled..r.prefilled + len],
                };
                StepInput { seq: r.seq, tokens }
            })
            .collect();
        // The engine answers every entry: GPU failures are re-run on the
        // CPU inside it, and a bad entry fails alone.
        let results = self.engine.step_select(&inputs, &wants);
        let ran_in = inputs.len();
        self.metrics.batch_size.observe(ran_in as f64);
        drop(inputs);
        let moved = self.publish_engine_events();
        for ((idx, work), result) in plan.into_iter().zip(results) {
            if self.cancel_if_abandoned(idx) {
                continue;
            }
            let token = match result {
                Ok(StepOutput::Token(token)) => token,
                Ok(StepOutput::Logits(_)) => {
                    self.fail(idx, format!("step {batch_id} returned logits where a token was asked for"));
                    continue;
                }
                Err(reason) => {
                    self.fail(idx, format!("sequence failed in step {batch_id}: {reason}"));
                    continue;
                }
            };
            let r = &mut self.running[idx];
            if moved.contains(&r.seq) && r.job.replay_on_fallback && !r.generated.is_empty() {
                // Tokens chosen on the GPU would steer the CPU's continuation;
                // nobody has seen them, so start over on the CPU.
                if let Err(err) = self.engine.restart_on_cpu(r.seq) {
                    self.fail(idx, format!("restarting on the CPU failed: {err}"));
                    continue;
                }
                let r = &mut self.running[idx];
                r.prefilled = 0;
                r.cached = 0;
                r.generated.clear();
                r.output = OutputText::new(r.job.stop.clone());
                match Sampler::new(r.job.sampling.clone()) {
                    Ok(sampler) => r.sampler = sampler,
                    Err(err) => self.fail(idx, format!("bad sampling settings: {err}")),
                }
                continue;
            }
            r.first_batch_id.get_or_insert(batch_id);
            r.largest_batch = r.largest_batch.max(ran_in);
            match work {
                Work::Prefill { len } => {
                    r.prefilled += len;
                    self.metrics.prompt_tokens_total.fetch_add(len as u64, Ordering::Relaxed);
                    if r.in_prefill() {
                        continue;
                    }
                }
                Work::Decode => {}
            }
            self.on_token(idx, token);
        }
    }

    /// Chooses this step's entries: decodes, then prefill chunks, then
    /// newly admitted requests, within the token budget.
    fn plan(&mut self) -> Vec<(usize, Work)> {
        let mut budget = self.config.max_batch_tokens;
        let mut plan = Vec::new();
        let n = self.running.len();
        for k in 0..n {
            let idx = (k + self.rotation) % n;
            if budget > 0 && !self.running[idx].in_prefill() {
                plan.push((idx, Work::Decode));
                budget -= 1;
            }
        }
        self.rotation = self.rotation.wrapping_add(1);
        for idx in 0..n {
            let r = &self.running[idx];
            if budget > 0 && r.in_prefill() {
                let len = (r.job.prompt.len() - r.prefilled).min(budget);
                plan.push((idx, Work::Prefill { len }));
                budget -= len;
            }
        }
        while budget > 0 && self.running.len() < self.config.max_batch_size {
            let Some(job) = self.waiting.pop_front() else { break };
            let Some(idx) = self.admit(job) else { continue };
            let r = &self.running[idx];
            let len = (r.job.prompt.len() - r.prefilled).min(budget);
            plan.push((idx, Work::Prefill { len }));
            budget -= len;
        }
        plan
    }

    /// Reserves KV space and starts a request; reports failure to its handler.
    fn admit(&mut self, job: Job) -> Option<usize> {
        let seq = self.next_seq;
        self.next_seq += 1;
        let sampler = match Sampler::new(job.sampling.clone()) {
            Ok(sampler) => sampler,
            Err(err) => {
                let _ = job.events.send(Event::Failed(format!("bad sampling settings: {err}")));
                self.metrics.requests_failed_total.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        };
        if let Err(err) = self.engine.add_sequence(seq, job.prompt.len() + job.max_tokens, &job.preferences) {
            let _ = job.events.send(Event::Failed(format!("could not place the request: {err}")));
            self.metrics.requests_failed_total.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        // Positions another request already computed are copied, not run
        // again (the same bits either way); at least the last prompt token
        // is left to run, for the first token's logits.
        let cached = self.engine.reuse_prefix(seq, &job.prompt);
        self.metrics.prompt_tokens_cached_total.fetch_add(cached as u64, Ordering::Relaxed);
        let now = Instant::now();
        self.metrics.request_queue_time.observe_duration(now.duration_since(job.arrived));
        let stops = job.stop.clone();
        self.running.push(Running {
            seq,
            job,
            sampler,
            prefilled: cached,
            cached,
            generated: Vec::new(),
            output: OutputText::new(stops),
            admitted: now,
            last_token_at: None,
            first_batch_id: None,
            largest_batch: 0,
            done: false,
        });
        Some(self.running.len() - 1)
    }

    fn fail(&mut self, idx: usize, reason: String) {
        let r = &mut self.running[idx];
        eprintln!("bitnet serve: {reason}");
        self.engine.remove_sequence(r.seq);
        let _ = r.job.events.send(Event::Failed(reason));
        r.done = true;
        self.metrics.requests_failed_total.fetch_add(1, Ordering::Relaxed);
    }

    /// Records a sampled token and ends the request when a stop condition holds.
    fn on_token(&mut self, idx: usize, token: u32) {
        let now = Instant::now();
        let r = &mut self.running[idx];
        match r.last_token_at {
            None => self.metrics.time_to_first_token.observe_duration(now.duration_since(r.job.arrived)),
            Some(last) => self.metrics.inter_token_latency.observe_duration(now.duration_since(last)),
        }
        r.last_token_at = Some(now);
        r.generated.push(token);
        self.metrics.generation_tokens_total.fetch_add(1, Ordering::Relaxed);

        let stop_token = self.tokenizer.is_stop(token);
        let shown = if stop_token { &r.generated[..r.generated.len() - 1] } else { &r.generated[..] };
        let text = match self.tokenizer.decode(shown, true) {
            Ok(text) => text,
            Err(err) => return self.fail(idx, format!("decoding generated tokens failed: {err}")),
        };
        let (final_text, delta, reason) = match r.output.update(&text) {
            TextUpdate::Stopped { text, delta } => (text, delta, Some(FinishReason::Stop)),
            TextUpdate::Continue { delta } if stop_token => {
                (text.clone(), delta + &r.output.finish(&text), Some(FinishReason::Stop))
            }
            TextUpdate::Continue { delta } if r.generated.len() >= r.job.max_tokens => {
                (text.clone(), delta + &r.output.finish(&text), Some(FinishReason::Length))
            }
            TextUpdate::Continue { delta } => (String::new(), delta, None),
        };
        if !delta.is_empty() {
            let _ = r.job.events.send(Event::Delta(delta));
        }
        let Some(finish_reason) = reason else { return };
        let Some(report) = self.engine.report(r.seq).cloned() else {
            return self.fail(idx, "the engine lost the sequence".into());
        };
        // Kept in the prefix cache (when it is on) for requests that start
        // with the same tokens: a follow-up turn of a chat, a shared prompt.
        self.engine.retire_sequence(r.seq);
        r.done = true;
        self.metrics.e2e_request_latency.observe_duration(now.duration_since(r.job.arrived));
        self.metrics.request_success.inc(finish_reason.as_str());
        let _ = r.job.events.send(Event::Done(Finished {
            text: final_text,
            finish_reason,
            prompt_tokens: r.job.prompt.len(),
            cached_tokens: r.cached,
            completion_tokens: r.generated.len(),
            stats: RunStats {
                batch_id: r.first_batch_id.unwrap_or_default(),
                batch_size: r.largest_batch,
                queue: r.admitted.duration_since(r.job.arrived),
                compute: now.duration_since(r.admitted),
                report,
            },
        }));
    }
}
