//! The scheduler driven step by step on the synthetic model: fairness and its bound,
//! the per-step adapter limit, preemption by recompute, cancellation, seeds.

mod common;

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use batos_engine::{
    AdapterResidency, BaseOnly, FinishReason, GenerationParams, RequestEvent, Scheduler,
    SchedulerConfig, StopReason, StreamEvent,
};
use batos_kernels::sampling::SamplingParams;
use batos_model::forward::LlamaModel;
use batos_model::generate::{GeneratorConfig, SimpleGenerator};
use batos_types::RequestId;
use common::{kv, model, step, tokens, TestAdapters};

fn config(seqs: usize, batch: usize, chunk: usize, loras: usize) -> SchedulerConfig {
    SchedulerConfig {
        max_num_seqs: NonZeroUsize::new(seqs).unwrap(),
        max_batch_tokens: NonZeroUsize::new(batch).unwrap(),
        prefill_chunk: NonZeroUsize::new(chunk).unwrap(),
        max_loras: loras,
    }
}

fn scheduler(
    model: &LlamaModel,
    cfg: SchedulerConfig,
    blocks: usize,
    block_size: usize,
    residency: Arc<dyn AdapterResidency>,
) -> Scheduler {
    let d = *model.dims();
    Scheduler::new(
        cfg,
        kv(&d, blocks, block_size),
        residency,
        d.vocab_size,
        d.max_position,
        None,
    )
    .unwrap()
}

/// Tokens and finish of every request, from events.
#[derive(Default)]
struct Outputs {
    tokens: HashMap<RequestId, Vec<u32>>,
    finish: HashMap<RequestId, (StopReason, batos_engine::Usage)>,
}

impl Outputs {
    fn take(&mut self, events: Vec<RequestEvent>) {
        for e in events {
            match e.event {
                StreamEvent::Token(t) => self.tokens.entry(e.request).or_default().push(t.token),
                StreamEvent::Finished(f) => {
                    assert!(
                        self.finish.insert(e.request, (f.reason, f.usage)).is_none(),
                        "{:?} finished twice",
                        e.request
                    );
                }
            }
        }
    }
}

fn run_to_end(
    sched: &mut Scheduler,
    model: &LlamaModel,
    residency: &dyn AdapterResidency,
    out: &mut Outputs,
) -> usize {
    let mut steps = 0;
    while sched.has_work() {
        let (plan, events) = step(sched, model, residency);
        assert!(!plan.is_empty(), "live requests but nothing scheduled");
        out.take(events);
        steps += 1;
        assert!(steps < 100_000, "no progress");
    }
    steps
}

/// Steps from the moment `b` is queued until its first token, while adapter "a" floods.
fn steps_until_first_token(
    sched: &mut Scheduler,
    model: &LlamaModel,
    residency: &Arc<TestAdapters>,
    b: RequestId,
    b_adapter: Option<&str>,
) -> usize {
    let ticket = b_adapter.map(|n| residency.acquire(n).unwrap());
    sched
        .add(b, tokens(10, 999, 256), GenerationParams::greedy(6), ticket)
        .unwrap();
    for k in 1..=1000 {
        let (_, events) = step(sched, model, residency.as_ref());
        if events
            .iter()
            .any(|e| e.request == b && matches!(e.event, StreamEvent::Token(_)))
        {
            return k;
        }
    }
    panic!("request {b:?} never got a token");
}

fn flood(sched: &mut Scheduler, residency: &Arc<TestAdapters>, n: u64) {
    for i in 0..n {
        let t = residency.acquire("a").unwrap();
        sched
            .add(
                RequestId(i),
                tokens(10, i as u32, 256),
                GenerationParams::greedy(6),
                Some(t),
            )
            .unwrap();
    }
}

/// The bound stated in the scheduler docs: with every running request advancing each
/// step (`max_batch_tokens ≥ max_num_seqs · prefill_chunk`) and no preemption, a new
/// request on another adapter waits at most 2·S steps, S = ⌈(prompt + max_tokens) /
/// chunk⌉ + max_tokens, however long the flood. FCFS would make it wait for all 40.
#[test]
fn fairness_bound() {
    let model = model();
    // S = ⌈16 / 8⌉ + 6 = 8.
    let bound = 2 * 8;
    for (loras, b_adapter) in [(2, Some("b")), (1, Some("b")), (1, None)] {
        let residency = TestAdapters::new(&["a", "b"], 2);
        let mut sched = scheduler(&model, config(4, 32, 8, loras), 256, 16, residency.clone());
        flood(&mut sched, &residency, 40);
        for _ in 0..3 {
            step(&mut sched, &model, residency.as_ref());
        }
        let waited =
            steps_until_first_token(&mut sched, &model, &residency, RequestId(1000), b_adapter);
        let a_waiting = sched
            .queue_counts()
            .iter()
            .find(|q| q.adapter.as_deref() == Some("a"))
            .map_or(0, |q| q.waiting);
        assert!(
            waited <= bound,
            "max_loras {loras}, b on {b_adapter:?}: waited {waited} steps, bound {bound}"
        );
        assert!(
            a_waiting > 10,
            "the flood should still be queued ({a_waiting} waiting)"
        );
        let mut out = Outputs::default();
        run_to_end(&mut sched, &model, residency.as_ref(), &mut out);
        assert_eq!(sched.counters().finished, 41);
        println!("max_loras {loras}, b on {b_adapter:?}: first token after {waited} steps (bound {bound})");
        assert_eq!(residency.live_leases(), 0);
        assert_eq!(sched.kv_stats().used_blocks, 0);
    }
}

/// Two floods on two adapters are served in turns: after both have run a while, the
/// tokens each got differ by at most one step's worth plus one prompt.
#[test]
fn two_floods_share_the_steps() {
    let model = model();
    let residency = TestAdapters::new(&["a", "b"], 2);
    let mut sched = scheduler(&model, config(4, 32, 8, 2), 256, 16, residency.clone());
    flood(&mut sched, &residency, 30);
    for i in 0..30u64 {
        let t = residency.acquire("b").unwrap();
        sched
            .add(
                RequestId(100 + i),
                tokens(10, 500 + i as u32, 256),
                GenerationParams::greedy(6),
                Some(t),
            )
            .unwrap();
    }
    let mut out = Outputs::default();
    for _ in 0..60 {
        let (_, events) = step(&mut sched, &model, residency.as_ref());
        out.take(events);
    }
    let served = |lo: u64, hi: u64| {
        out.tokens
            .iter()
            .filter(|(id, _)| (lo..hi).contains(&id.0))
            .map(|(_, t)| t.len())
            .sum::<usize>()
    };
    let (a, b) = (served(0, 30), served(100, 130));
    assert!(a > 20 && b > 20, "both adapters served: a {a}, b {b}");
    assert!(a.abs_diff(b) <= 32 + 10, "a got {a} tokens, b got {b}");
}

#[test]
fn at_most_max_loras_adapters_per_step() {
    let model = model();
    let names = ["a", "b", "c", "d"];
    let residency = TestAdapters::new(&names, 2);
    let mut sched = scheduler(&model, config(8, 64, 16, 2), 256, 16, residency.clone());
    for i in 0..24u64 {
        let name = names[i as usize % 4];
        let ticket = if i % 5 == 0 {
            None
        } else {
            Some(residency.acquire(name).unwrap())
        };
        sched
            .add(
                RequestId(i),
                tokens(5 + i as usize % 20, i as u32, 256),
                GenerationParams::greedy(4 + i as usize % 7),
                ticket,
            )
            .unwrap();
    }
    let mut out = Outputs::default();
    let mut seen_two = false;
    while sched.has_work() {
        let (plan, events) = step(&mut sched, &model, residency.as_ref());
        assert!(!plan.is_empty());
        assert!(
            plan.distinct_adapters() <= 2,
            "{} adapters in one step",
            plan.distinct_adapters()
        );
        seen_two |= plan.distinct_adapters() == 2;
        out.take(events);
    }
    assert!(seen_two, "two adapters never shared a step");
    assert!(residency.max_distinct_per_step.load(Ordering::Relaxed) <= 2);
    assert_eq!(out.finish.len(), 24);
    for (id, (reason, usage)) in &out.finish {
        assert!(
            matches!(reason, StopReason::Finished(FinishReason::Length)),
            "{id:?}: {reason:?}"
        );
        assert_eq!(usage.completion_tokens, out.tokens[id].len());
    }
    assert_eq!(residency.live_leases(), 0);
    assert_eq!(residency.live_pins(), 0);
}

fn seeded(seed: u64) -> SamplingParams {
    SamplingParams {
        temperature: 0.9,
        top_k: Some(50),
        seed: Some(seed),
        ..SamplingParams::default()
    }
}

/// Tokens of each request generated alone by the reference harness.
fn alone(model: &LlamaModel, prompt: &[u32], params: &GenerationParams) -> Vec<u32> {
    let d = *model.dims();
    let cfg = GeneratorConfig {
        prefill_chunk: NonZeroUsize::new(8).unwrap(),
        max_batch_tokens: NonZeroUsize::new(64).unwrap(),
    };
    let mut g = SimpleGenerator::new(model, kv(&d, 64, 4), cfg);
    g.generate(prompt, params, None).unwrap().tokens
}

#[test]
fn preemption_by_recompute_keeps_outputs() {
    let model = model();
    // Base model, then every request on one of two adapters (pins dropped on
    // preemption and taken again on readmission).
    for with_adapters in [false, true] {
        let adapters = TestAdapters::new(&["a", "b"], 2);
        let residency: Arc<dyn AdapterResidency> = if with_adapters {
            adapters.clone()
        } else {
            Arc::new(BaseOnly)
        };
        // 12 blocks of 4 tokens; three requests of 8 + 16 tokens need 18 at the end.
        let loras = if with_adapters { 2 } else { 0 };
        let mut sched = scheduler(&model, config(8, 64, 8, loras), 12, 4, residency.clone());
        let mut reqs = Vec::new();
        for i in 0..3u64 {
            let mut params = GenerationParams::greedy(16);
            if i == 1 {
                params.sampling = seeded(7);
            }
            let prompt = tokens(8, 40 + i as u32, 256);
            let ticket =
                with_adapters.then(|| residency.acquire(["a", "b"][i as usize % 2]).unwrap());
            sched
                .add(RequestId(i), prompt.clone(), params.clone(), ticket)
                .unwrap();
            reqs.push((prompt, params));
        }
        let mut out = Outputs::default();
        run_to_end(&mut sched, &model, residency.as_ref(), &mut out);
        assert!(
            sched.counters().preemptions > 0,
            "the pool was big enough: no preemption"
        );
        let preempted: u32 = out.finish.values().map(|(_, u)| u.preemptions).sum();
        assert_eq!(u64::from(preempted), sched.counters().preemptions);
        for (i, (prompt, params)) in reqs.iter().enumerate() {
            let id = RequestId(i as u64);
            assert_eq!(
                out.tokens[&id],
                alone(&model, prompt, params),
                "request {i}"
            );
            let (reason, usage) = &out.finish[&id];
            assert_eq!(*reason, StopReason::Finished(FinishReason::Length));
            assert_eq!((usage.prompt_tokens, usage.completion_tokens), (8, 16));
        }
        let kv = sched.kv_stats();
        assert_eq!((kv.used_blocks, kv.sequences), (0, 0));
        assert_eq!((adapters.live_leases(), adapters.live_pins()), (0, 0));
    }
}

#[test]
fn cancellation_frees_blocks_at_once() {
    let model = model();
    let residency = TestAdapters::new(&["a"], 1);
    let mut sched = scheduler(&model, config(2, 64, 8, 1), 64, 16, residency.clone());
    for i in 0..3u64 {
        let t = residency.acquire("a").unwrap();
        sched
            .add(
                RequestId(i),
                tokens(20, i as u32, 256),
                GenerationParams::greedy(50),
                Some(t),
            )
            .unwrap();
    }
    for _ in 0..4 {
        step(&mut sched, &model, residency.as_ref());
    }
    assert_eq!(sched.running().len(), 2, "two seats");
    let before = sched.kv_stats().used_blocks;
    assert_eq!(
        before, 4,
        "two requests of 20-23 tokens hold two blocks each"
    );

    // Running: its two blocks are free when cancel returns.
    let ev = sched.cancel(RequestId(0)).unwrap().expect("live");
    assert_eq!(sched.kv_stats().used_blocks, before - 2);
    match ev.event {
        StreamEvent::Finished(f) => {
            assert_eq!(f.reason, StopReason::Cancelled);
            assert_eq!(f.usage.prompt_tokens, 20);
            assert!(f.usage.completion_tokens > 0);
        }
        other => panic!("expected a finish, got {other:?}"),
    }
    assert!(
        sched.cancel(RequestId(0)).unwrap().is_none(),
        "cancelled twice"
    );
    // Waiting (never admitted): leaves its queue.
    assert!(sched.cancel(RequestId(2)).unwrap().is_some());
    assert!(sched.cancel(RequestId(1)).unwrap().is_some());
    let kv = sched.kv_stats();
    assert_eq!((kv.used_blocks, kv.sequences), (0, 0));
    assert!(!sched.has_work());
    assert_eq!(residency.live_leases(), 0);
    assert_eq!(residency.live_pins(), 0);
    assert_eq!(sched.counters().cancelled, 3);
}

/// A seeded request gives the same tokens alone and inside a busy batch of other
/// requests at other positions (with preemptions), and another seed gives others.
#[test]
fn seeds_do_not_depend_on_batch_composition() {
    let model = model();
    let prompt = tokens(12, 4242, 256);
    let mut params = GenerationParams::greedy(20);
    params.sampling = seeded(42);
    let target = RequestId(1_000);

    let mut solo = scheduler(&model, config(8, 64, 8, 0), 64, 4, Arc::new(BaseOnly));
    solo.add(target, prompt.clone(), params.clone(), None)
        .unwrap();
    let mut out = Outputs::default();
    run_to_end(&mut solo, &model, &BaseOnly, &mut out);
    let alone_tokens = out.tokens[&target].clone();
    assert_eq!(alone_tokens, alone(&model, &prompt, &params));

    for (blocks, seqs) in [(256, 16), (40, 8)] {
        let mut busy = scheduler(
            &model,
            config(seqs, 48, 8, 0),
            blocks,
            4,
            Arc::new(BaseOnly),
        );
        for i in 0..12u64 {
            let mut p = GenerationParams::greedy(5 + i as usize * 3);
            if i % 2 == 0 {
                p.sampling = seeded(i);
            }
            busy.add(
                RequestId(i),
                tokens(3 + i as usize * 7, i as u32, 256),
                p,
                None,
            )
            .unwrap();
            if i == 5 {
                busy.add(target, prompt.clone(), params.clone(), None)
                    .unwrap();
            }
        }
        let mut out = Outputs::default();
        run_to_end(&mut busy, &model, &BaseOnly, &mut out);
        assert_eq!(out.tokens[&target], alone_tokens, "pool of {blocks} blocks");
        if blocks == 40 {
            assert!(
                busy.counters().preemptions > 0,
                "the small pool preempted nothing"
            );
        }
    }

    let mut other = params.clone();
    other.sampling.seed = Some(43);
    assert_ne!(
        alone(&model, &prompt, &other),
        alone_tokens,
        "seed 43 gave seed 42's tokens"
    );
}

#[test]
fn bad_requests_are_refused_and_leases_released() {
    let model = model();
    let residency = TestAdapters::new(&["a"], 1);
    let mut sched = scheduler(&model, config(2, 64, 8, 1), 8, 4, residency.clone());
    let cases: Vec<(Vec<u32>, GenerationParams)> = vec![
        (vec![], GenerationParams::greedy(4)),
        (vec![1, 2, 300], GenerationParams::greedy(4)),
        (vec![1, 2, 3], GenerationParams::greedy(0)),
        // 8 blocks of 4 hold 32 tokens.
        (tokens(20, 1, 256), GenerationParams::greedy(13)),
        (vec![1; 600], GenerationParams::greedy(1)),
        (
            vec![1, 2],
            GenerationParams {
                stop_strings: vec!["x".into()],
                ..GenerationParams::greedy(3)
            },
        ),
        (
            vec![1, 2],
            GenerationParams {
                sampling: SamplingParams {
                    top_p: 0.0,
                    ..SamplingParams::default()
                },
                ..GenerationParams::greedy(3)
            },
        ),
    ];
    for (i, (prompt, params)) in cases.into_iter().enumerate() {
        let t = residency.acquire("a").unwrap();
        let err = sched
            .add(RequestId(i as u64), prompt, params, Some(t))
            .unwrap_err();
        assert!(
            matches!(err, batos_engine::EngineError::InvalidRequest { .. }),
            "case {i}: {err}"
        );
    }
    assert_eq!(residency.live_leases(), 0);
    assert!(!sched.has_work());
}

/// The serving load: 64 streams over 4 adapters arriving together, under the
/// default scheduler config. All 64 are admitted (64 seats, 4 adapters ≤ max_loras),
/// every request's prompt is computed within ⌈prompt tokens / (budget − 64)⌉ + 1 steps
/// of arrival (chunked prefill shares each step with the decodes of those already
/// running), and from then on every step decodes all 64 together, with no preemption,
/// in a batch grouped by adapter.
#[test]
fn sixty_four_streams_over_four_adapters_decode_together() {
    let model = model();
    let names = ["a", "b", "c", "d"];
    let residency = TestAdapters::new(&names, 4);
    let cfg = SchedulerConfig::default();
    assert_eq!(cfg.max_num_seqs.get(), 64);
    assert!(cfg.max_loras >= 4);
    let (prompt_len, max_tokens) = (40, 24);
    // Every seat can hold a whole request: 64 × ⌈64 / 16⌉ blocks.
    let mut sched = scheduler(&model, cfg, 64 * 4, 16, residency.clone());
    for i in 0..64u64 {
        let ticket = residency.acquire(names[i as usize % 4]).unwrap();
        sched
            .add(
                RequestId(i),
                tokens(prompt_len, i as u32, 256),
                GenerationParams::greedy(max_tokens),
                Some(ticket),
            )
            .unwrap();
    }
    let budget = cfg.max_batch_tokens.get();
    let ttft_bound = (64 * prompt_len).div_ceil(budget - 64) + 1;
    let mut out = Outputs::default();
    let mut first_token_step = HashMap::new();
    let mut full_decode_steps = 0;
    let mut steps = 0;
    while sched.has_work() {
        let (plan, events) = step(&mut sched, &model, residency.as_ref());
        steps += 1;
        assert!(plan.preempted.is_empty(), "step {steps} preempted");
        assert!(plan.distinct_adapters() <= 4);
        // Grouped by adapter, so the LoRA kernels read each adapter once per run.
        assert!(plan
            .batch
            .seqs
            .windows(2)
            .all(|w| w[0].adapter <= w[1].adapter));
        let decodes = plan.seqs.iter().filter(|s| !s.prefill).count();
        if decodes == 64 {
            full_decode_steps += 1;
        }
        for e in &events {
            if matches!(e.event, StreamEvent::Token(_)) {
                first_token_step.entry(e.request).or_insert(steps);
            }
        }
        out.take(events);
    }
    assert_eq!(out.finish.len(), 64);
    assert_eq!(first_token_step.len(), 64);
    let worst = *first_token_step.values().max().unwrap();
    assert!(
        worst <= ttft_bound,
        "a first token came at step {worst}, bound {ttft_bound}"
    );
    // Once all prompts are in, each of the remaining decode steps holds all 64
    // (the first token of each request comes from its prefill step).
    assert!(
        full_decode_steps >= max_tokens - 1 - worst,
        "only {full_decode_steps} steps decoded all 64 (of {steps})"
    );
    assert_eq!(residency.live_leases(), 0);
    assert_eq!(residency.live_pins(), 0);
}
