//! The prefix cache: retired sequences kept, reused with the same bits,
//! evicted by budget and by GPU memory, dropped with a poisoned GPU.

use super::*;

/// Runs `prompt` and `new_tokens` greedy tokens on `seq`, started from the
/// prefix cache: returns the tokens and how many prompt positions were copied.
fn generate_cached(
    engine: &mut Engine,
    seq: SeqId,
    prompt: &[u32],
    new_tokens: usize,
    prefs: &RequestPreferences,
) -> (Vec<u32>, usize) {
    engine.add_sequence(seq, prompt.len() + new_tokens, prefs).unwrap();
    let cached = engine.reuse_prefix(seq, prompt);
    let mut feed = prompt[cached..].to_vec();
    let mut out = Vec::new();
    for _ in 0..new_tokens {
        let result = engine.step_select(&[StepInput { seq, tokens: &feed }], &[StepWant::Greedy]).remove(0);
        let Ok(StepOutput::Token(token)) = result else { panic!("seq {seq}: {result:?}") };
        out.push(token);
        feed = vec![token];
    }
    (out, cached)
}

fn cached_settings(tokens: usize) -> EngineConfig {
    EngineConfig { prefix_cache_tokens: tokens, ..settings() }
}

/// A prompt of `len` tokens that starts with `head`.
fn extended(head: &[u32], len: usize, salt: u32) -> Vec<u32> {
    head.iter().copied().chain((head.len() as u32..).map(|i| (i * 29 + salt) % 500)).take(len).collect()
}

#[test]
fn retired_sequences_are_reused_with_the_same_tokens() {
    let (mut simulated, _) = simulated_engine(FaultPlan::default());
    simulated.settings.prefix_cache_tokens = 1000;
    let engines = [
        (Engine::cpu_only_with(cpu(), cached_settings(1000)), wants(DevicePreference::Cpu, None)),
        (simulated, gpu_mixed()),
    ];
    for (mut engine, prefs) in engines {
        let first = extended(&[], 12, 3);
        let (out, cached) = generate_cached(&mut engine, 1, &first, 5, &prefs);
        assert_eq!((out.clone(), cached), (cpu_alone(&first, 5), 0));
        engine.retire_sequence(1);
        // It holds the prompt and the first four generated tokens (the fifth was never fed).
        assert_eq!(engine.prefix_cache_stats().tokens, 16);
        assert_eq!(engine.sequence_len(1), None);
        let held: Vec<u32> = first.iter().chain(&out[..4]).copied().collect();
        // A shared beginning, a longer prompt inside the held tokens, the same prompt again:
        // copied up to the common prefix, but never the prompt's last token.
        let cases = [(extended(&first[..8], 14, 11), 8), (held[..15].to_vec(), 14), (first.clone(), 11)];
        for (seq, (prompt, expect_cached)) in (2..).zip(cases) {
            let (tokens, cached) = generate_cached(&mut engine, seq, &prompt, 4, &prefs);
            assert_eq!(cached, expect_cached, "seq {seq}");
            assert_eq!(tokens, cpu_alone(&prompt, 4), "seq {seq}: a reused prefix must continue exactly");
            engine.remove_sequence(seq);
        }
        let stats = engine.prefix_cache_stats();
        assert_eq!((stats.entries, stats.hits, stats.reused_tokens), (1, 3, 8 + 14 + 11));
        // Another device's entries are not used: a CPU request beside a GPU entry, and vice versa.
        let other =
            if prefs.device == DevicePreference::Cpu { gpu_mixed() } else { wants(DevicePreference::Cpu, None) };
        let report = engine.add_sequence(9, 20, &other).unwrap().clone();
        let reused = engine.reuse_prefix(9, &first);
        assert_eq!(
            reused,
            usize::from(report.device == "cpu" && prefs.device == DevicePreference::Cpu) * 11,
            "{report:?}"
        );
    }
}

#[test]
fn the_cache_keeps_to_its_budget_least_recently_used_first() {
    let mut engine = Engine::cpu_only_with(cpu(), cached_settings(30));
    let cpu_prefs = wants(DevicePreference::Cpu, None);
    let prompts: Vec<Vec<u32>> = (0..4).map(|i| extended(&[100 + i], 10, 7 * i)).collect();
    // Entries of 10 + 2 - 1 = 11 positions.
    for (seq, prompt) in (1..).zip(&prompts[..2]) {
        generate_cached(&mut engine, seq, prompt, 2, &cpu_prefs);
        engine.retire_sequence(seq);
    }
    assert_eq!(engine.prefix_cache_stats().tokens, 22);
    // Using the first makes the second the least recently used.
    assert_eq!(generate_cached(&mut engine, 3, &prompts[0], 1, &cpu_prefs).1, 9);
    engine.remove_sequence(3);
    generate_cached(&mut engine, 4, &prompts[2], 2, &cpu_prefs);
    engine.retire_sequence(4);
    let stats = engine.prefix_cache_stats();
    assert_eq!((stats.entries, stats.tokens, stats.evictions), (2, 22, 1));
    let reused = |engine: &mut Engine, seq, prompt: &[u32]| {
        engine.add_sequence(seq, 20, &cpu_prefs).unwrap();
        let n = engine.reuse_prefix(seq, prompt);
        engine.remove_sequence(seq);
        n
    };
    assert_eq!(reused(&mut engine, 5, &prompts[1]), 0, "the least recently used entry was evicted");
    assert_eq!(reused(&mut engine, 6, &prompts[0]), 9);
    assert_eq!(reused(&mut engine, 7, &prompts[2]), 9);
    // Longer than the whole budget: not kept, nothing evicted for it.
    let long = extended(&[], 40, 5);
    generate_cached(&mut engine, 8, &long, 1, &cpu_prefs);
    engine.retire_sequence(8);
    assert_eq!(engine.prefix_cache_stats().entries, 2);
    // Off: retiring is removing, and nothing is reused.
    let mut off = Engine::cpu_only(cpu());
    generate_cached(&mut off, 1, &prompts[0], 2, &cpu_prefs);
    off.retire_sequence(1);
    assert_eq!(off.prefix_cache_stats(), PrefixCacheStats::default());
    assert_eq!(generate_cached(&mut off, 2, &prompts[0], 1, &cpu_prefs).1, 0);
    // A retired sequence's id is free again: its entry gives way.
    engine.add_sequence(1, 4, &cpu_prefs).unwrap();
    let stats = engine.prefix_cache_stats();
    assert_eq!((stats.entries, stats.evictions), (1, 2));
    assert_eq!(engine.sequence_len(1), Some(0));
}

#[test]
fn gpu_entries_give_way_to_new_sequences() {
    let plan = |positions| crate::memory_plan::gpu_memory_plan_for_model(&model(), Precision::Bf16, positions, 64);
    // Room for the backend plus three sequences of 20 positions, at 100% utilization.
    let gpu = FaultPlan::default().apply(&simulated_gpu_info(plan(60).total()));
    let injector = Arc::new(FaultInjector::new(FaultPlan::default()));
    let primary = simulated_primary(model(), cpu_config(), gpu, injector, 64);
    let settings = EngineConfig { gpu_memory_utilization: 1.0, ..cached_settings(1000) };
    let mut engine = Engine::new(cpu(), primary, settings).unwrap();
    // Three entries of 17 positions fill most of the room.
    for seq in 1..=3 {
        let (_, cached) = generate_cached(&mut engine, seq, &extended(&[seq as u32], 16, seq as u32), 2, &gpu_mixed());
        assert_eq!(cached, 0);
        assert_eq!(engine.report(seq).unwrap().fallback, None);
        engine.retire_sequence(seq);
    }
    assert_eq!(engine.prefix_cache_stats().entries, 3);
    // New sequences still get the GPU: entries are evicted for them, oldest first.
    for seq in 4..=6 {
        assert_eq!(engine.add_sequence(seq, 20, &gpu_mixed()).unwrap().fallback, None, "seq {seq}");
    }
    let stats = engine.prefix_cache_stats();
    assert_eq!((stats.entries, stats.evictions), (0, 3));
    // With the GPU full of running sequences, the next one falls back as before.
    let report = engine.add_sequence(7, 20, &gpu_mixed()).unwrap();
    assert_eq!(fallback_reason(report), Some(FallbackReason::InsufficientGpuMemory));
}

#[test]
fn a_poisoned_gpu_takes_its_entries_with_it() {
    let broken = Arc::new(AtomicBool::new(false));
    let mut engine = switchable_engine(broken.clone());
    engine.settings.prefix_cache_tokens = 1000;
    engine.settings.cool_down = Duration::from_secs(3600);
    let prompt = extended(&[], 10, 1);
    generate_cached(&mut engine, 1, &prompt, 2, &gpu_mixed());
    engine.retire_sequence(1);
    generate_cached(&mut engine, 2, &prompt, 2, &wants(DevicePreference::Cpu, None));
    engine.retire_sequence(2);
    assert_eq!(engine.prefix_cache_stats().entries, 2);
    // A failing step poisons the GPU: its entry goes, the CPU's stays, and
    // the moved sequence continues on the CPU exactly.
    engine.add_sequence(3, 20, &gpu_mixed()).unwrap();
    assert_eq!(engine.reuse_prefix(3, &prompt), 9);
    broken.store(true, Ordering::SeqCst);
    let result = engine.step_select(&[StepInput { seq: 3, tokens: &prompt[9..] }], &[StepWant::Greedy]).remove(0);
    assert_eq!(result, Ok(StepOutput::Token(cpu_alone(&prompt, 1)[0])));
    assert_eq!(engine.health(), GpuHealth::CoolingDown);
    assert_eq!(engine.prefix_cache_stats().entries, 1);
    assert_eq!(engine.report(3).unwrap().device, "cpu");
}
