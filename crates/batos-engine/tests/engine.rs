//! The engine end to end on the synthetic model: equality with the reference harness,
//! async streams, cancellation, shutdown, metrics, and a concurrent stress test.

mod common;

use std::future::Future;
use std::num::NonZeroUsize;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake};
use std::thread;

use batos_engine::{
    Engine, EngineError, FinishReason, GenerateRequest, GenerationParams, KvPoolSize, Prompt,
    ShutdownMode, StopReason, StreamEvent, DEFAULT_TOKENS_PER_SEQ,
};
use batos_kernels::sampling::SamplingParams;
use batos_model::generate::{GenerationRequest, GeneratorConfig, SimpleGenerator};
use common::{kv, model, tokens, TestAdapters};
use rand::{Rng, SeedableRng};

fn engine(blocks: usize, seqs: usize) -> Engine {
    Engine::builder()
        .runtime_model(model(), None)
        .kv_pool_blocks(blocks)
        .block_size(16)
        .max_num_seqs(seqs)
        .max_batch_tokens(40)
        .prefill_chunk(8)
        .build()
        .unwrap()
}

fn request(prompt: Vec<u32>, params: GenerationParams) -> GenerateRequest {
    GenerateRequest::new(Prompt::Tokens(prompt), params)
}

/// Runs a future to completion on this thread (no runtime needed by the stream).
fn block_on<F: Future>(f: F) -> F::Output {
    struct Unpark(thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Arc::new(Unpark(thread::current())).into();
    let mut cx = Context::from_waker(&waker);
    let mut f = pin!(f);
    loop {
        match f.as_mut().poll(&mut cx) {
            Poll::Ready(v) => return v,
            Poll::Pending => thread::park(),
        }
    }
}

#[test]
fn engine_equals_simple_generator_for_greedy_requests() {
    let model = model();
    let d = *model.dims();
    let requests: Vec<GenerationRequest> = (0..10u32)
        .map(|i| {
            let mut params = GenerationParams::greedy(4 + (i as usize * 5) % 17);
            if i == 3 {
                params.stop_token_ids = vec![7, 9, 11, 13];
            }
            GenerationRequest {
                prompt: tokens(1 + (i as usize * 23) % 50, i + 3, d.vocab_size),
                params,
            }
        })
        .collect();
    let cfg = GeneratorConfig {
        prefill_chunk: NonZeroUsize::new(8).unwrap(),
        max_batch_tokens: NonZeroUsize::new(40).unwrap(),
    };
    let mut reference = SimpleGenerator::new(&model, kv(&d, 128, 16), cfg);
    let expected = reference.generate_batch(&requests, None).unwrap();

    let engine = engine(128, 16);
    let streams: Vec<_> = requests
        .iter()
        .map(|r| {
            engine
                .generate(request(r.prompt.clone(), r.params.clone()))
                .unwrap()
        })
        .collect();
    for (i, (s, e)) in streams.into_iter().zip(&expected).enumerate() {
        let got = s.wait();
        assert_eq!(got.tokens, e.tokens, "request {i}");
        assert_eq!(
            got.reason,
            StopReason::Finished(e.finish.clone()),
            "request {i}"
        );
        assert_eq!(got.usage.completion_tokens, e.tokens.len());
        assert_eq!(got.usage.prompt_tokens, requests[i].prompt.len());
        assert!(got.time_to_first_token.is_some());
    }
    let m = engine.metrics().unwrap();
    assert_eq!(m.ttft.count, 10);
    assert_eq!(m.counters.finished, 10);
    assert_eq!((m.kv.used_blocks, m.running(), m.waiting()), (0, 0, 0));
    engine.shutdown(ShutdownMode::Drain).unwrap();
}

#[test]
fn async_stream_matches_blocking() {
    let engine = engine(64, 4);
    let params = GenerationParams {
        sampling: SamplingParams {
            temperature: 0.7,
            seed: Some(5),
            logprobs: Some(2),
            ..SamplingParams::default()
        },
        ..GenerationParams::greedy(12)
    };
    let blocking = engine
        .generate(request(tokens(9, 1, 256), params.clone()))
        .unwrap()
        .wait();
    let mut stream = engine.generate(request(tokens(9, 1, 256), params)).unwrap();
    let (toks, finish) = block_on(async {
        let mut toks = Vec::new();
        let mut finish = None;
        while let Some(ev) = stream.next().await {
            match ev {
                StreamEvent::Token(t) => {
                    assert_eq!(t.logprobs.as_ref().unwrap().top_logprobs.len(), 2);
                    toks.push(t.token)
                }
                StreamEvent::Finished(f) => finish = Some(f),
            }
        }
        (toks, finish)
    });
    assert_eq!(toks, blocking.tokens);
    assert_eq!(blocking.logprobs.unwrap().len(), 12);
    let f = finish.unwrap();
    assert_eq!(f.reason, StopReason::Finished(FinishReason::Length));
    assert_eq!(f.usage.completion_tokens, 12);
    // Collecting asynchronously gives the same.
    let again = block_on(
        engine
            .generate(request(tokens(9, 1, 256), GenerationParams::greedy(3)))
            .unwrap()
            .collect(),
    );
    assert_eq!(again.tokens.len(), 3);
}

#[test]
fn cancel_frees_blocks_before_it_returns() {
    let engine = engine(64, 4);
    let mut stream = engine
        .generate(request(tokens(40, 2, 256), GenerationParams::greedy(400)))
        .unwrap();
    // Wait until it runs.
    assert!(matches!(
        stream.next_blocking(),
        Some(StreamEvent::Token(_))
    ));
    assert!(engine.metrics().unwrap().kv.used_blocks >= 3);
    assert!(engine.cancel(stream.id()));
    let m = engine.metrics().unwrap();
    assert_eq!((m.kv.used_blocks, m.kv.sequences, m.running()), (0, 0, 0));
    let rest: Vec<_> = stream.by_ref().collect();
    match rest.last() {
        Some(StreamEvent::Finished(f)) => assert_eq!(f.reason, StopReason::Cancelled),
        other => panic!("expected a cancelled finish, got {other:?}"),
    }
    assert!(!engine.cancel(stream.id()), "cancelled twice");
}

#[test]
fn dropping_a_stream_cancels_it() {
    let engine = engine(64, 4);
    let mut stream = engine
        .generate(request(tokens(30, 3, 256), GenerationParams::greedy(400)))
        .unwrap();
    assert!(matches!(
        stream.next_blocking(),
        Some(StreamEvent::Token(_))
    ));
    drop(stream);
    let m = engine.metrics().unwrap();
    assert_eq!(
        (m.kv.used_blocks, m.running(), m.counters.cancelled),
        (0, 0, 1)
    );
}

#[test]
fn shutdown_drains_or_cancels() {
    let engine = engine(64, 2);
    let streams: Vec<_> = (0..4)
        .map(|i| {
            engine
                .generate(request(tokens(10, i, 256), GenerationParams::greedy(20)))
                .unwrap()
        })
        .collect();
    engine.shutdown(ShutdownMode::Drain).unwrap();
    for s in streams {
        let c = s.wait();
        assert_eq!(
            (c.tokens.len(), c.reason),
            (20, StopReason::Finished(FinishReason::Length))
        );
    }

    let engine = engine_with_seqs(1);
    let streams: Vec<_> = (0..3)
        .map(|i| {
            engine
                .generate(request(tokens(10, i, 256), GenerationParams::greedy(450)))
                .unwrap()
        })
        .collect();
    engine.shutdown(ShutdownMode::Cancel).unwrap();
    for s in streams {
        let c = s.wait();
        assert_eq!(c.reason, StopReason::Cancelled);
        assert!(c.tokens.len() < 450);
    }
}

fn engine_with_seqs(seqs: usize) -> Engine {
    engine(64, seqs)
}

#[test]
fn builder_and_request_errors_are_typed() {
    let err = Engine::builder().build().unwrap_err();
    assert!(
        matches!(err, EngineError::InvalidConfig { field: "model", .. }),
        "{err}"
    );
    let err = Engine::builder()
        .runtime_model(model(), None)
        .max_num_seqs(0)
        .build()
        .unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::InvalidConfig {
                field: "max_num_seqs",
                ..
            }
        ),
        "{err}"
    );
    let err = Engine::builder()
        .runtime_model(model(), None)
        .prefill_chunk(100)
        .max_batch_tokens(50)
        .build()
        .unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::InvalidConfig {
                field: "prefill_chunk",
                ..
            }
        ),
        "{err}"
    );
    let err = Engine::builder()
        .runtime_model(model(), None)
        .max_loras(1)
        .build()
        .unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::InvalidConfig {
                field: "max_loras",
                ..
            }
        ),
        "{err}"
    );
    let err = Engine::builder()
        .runtime_model(model(), None)
        .block_size(0)
        .build()
        .unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::InvalidConfig {
                field: "kv_pool",
                ..
            }
        ),
        "{err}"
    );

    let no_loras = Engine::builder()
        .runtime_model(model(), None)
        .adapters(TestAdapters::new(&["a"], 2))
        .max_loras(0)
        .build()
        .unwrap();
    let err = no_loras
        .generate(request(vec![1, 2], GenerationParams::greedy(2)).with_adapter("a"))
        .unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::InvalidRequest {
                field: "adapter",
                ..
            }
        ),
        "{err}"
    );

    let engine = engine(8, 2);
    let err = engine
        .generate(GenerateRequest::new(
            Prompt::Text("hi".into()),
            GenerationParams::greedy(2),
        ))
        .unwrap_err();
    assert!(matches!(err, EngineError::NoTokenizer { .. }), "{err}");
    let err = engine
        .generate(request(vec![1, 2], GenerationParams::greedy(2)).with_adapter("x"))
        .unwrap_err();
    assert!(
        matches!(err, EngineError::AdaptersUnsupported { .. }),
        "{err}"
    );
    let err = engine
        .generate(request(vec![], GenerationParams::greedy(2)))
        .unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::InvalidRequest {
                field: "prompt",
                ..
            }
        ),
        "{err}"
    );
    assert!(engine.list_adapters().unwrap().is_empty());
}

/// Many threads submit, read, cancel and drop concurrently over a pool small enough
/// to preempt; nothing panics, every finished stream is whole, and at the end every
/// block, lease and pin is back.
#[test]
fn stress_generate_and_cancel() {
    let residency = TestAdapters::new(&["a", "b", "c"], 2);
    let engine = Arc::new(
        Engine::builder()
            .runtime_model(model(), None)
            .adapters(residency.clone())
            .kv_pool_blocks(24)
            .block_size(8)
            .max_num_seqs(6)
            .max_batch_tokens(48)
            .prefill_chunk(16)
            .build()
            .unwrap(),
    );
    let threads: Vec<_> = (0..6u64)
        .map(|t| {
            let engine = engine.clone();
            thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(t);
                let mut outcomes = [0usize; 3];
                for i in 0..25u32 {
                    let mut req = request(
                        tokens(rng.random_range(1..60), t as u32 * 100 + i, 256),
                        GenerationParams::greedy(rng.random_range(1..40)),
                    );
                    if let Some(name) =
                        [None, Some("a"), Some("b"), Some("c")][rng.random_range(0..4)]
                    {
                        req = req.with_adapter(name);
                    }
                    let max = req.params.max_tokens;
                    let mut s = engine.generate(req).unwrap();
                    match rng.random_range(0..3) {
                        0 => {
                            let c = s.wait();
                            assert_eq!(c.reason, StopReason::Finished(FinishReason::Length));
                            assert_eq!(c.tokens.len(), max);
                            outcomes[0] += 1;
                        }
                        1 => {
                            let _ = s.next_blocking();
                            engine.cancel(s.id());
                            let c = s.wait();
                            assert!(matches!(
                                c.reason,
                                StopReason::Cancelled | StopReason::Finished(_)
                            ));
                            outcomes[1] += 1;
                        }
                        _ => {
                            if rng.random_bool(0.5) {
                                let _ = s.next_blocking();
                            }
                            drop(s);
                            outcomes[2] += 1;
                        }
                    }
                }
                outcomes
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a client thread panicked");
    }
    let m = engine.metrics().unwrap();
    assert_eq!((m.kv.used_blocks, m.kv.sequences), (0, 0), "{:?}", m.kv);
    assert_eq!((m.running(), m.waiting()), (0, 0));
    assert_eq!(residency.live_leases(), 0);
    assert_eq!(residency.live_pins(), 0);
    assert_eq!(m.counters.finished + m.counters.cancelled, 150);
    Arc::try_unwrap(engine)
        .unwrap()
        .shutdown(ShutdownMode::Drain)
        .unwrap();
}

/// The default KV pool seats every request at the default length: `max_num_seqs`
/// sequences of `DEFAULT_TOKENS_PER_SEQ` tokens (capped at the model's context), so a
/// full house of streams decodes without preemption. Sizing by tokens per seat follows
/// `max_num_seqs`, and a size of zero is a typed error.
#[test]
fn default_kv_pool_holds_every_seat() {
    let context = model().dims().max_position;
    let per_seq = DEFAULT_TOKENS_PER_SEQ.min(context);
    for seqs in [64, 8] {
        let engine = Engine::builder()
            .runtime_model(model(), None)
            .max_num_seqs(seqs)
            .build()
            .unwrap();
        let limits = engine.limits();
        assert!(
            limits.kv_capacity_tokens >= seqs * per_seq,
            "{} tokens for {seqs} seats of {per_seq}",
            limits.kv_capacity_tokens
        );
        assert!(limits.kv_capacity_tokens < seqs * per_seq + seqs * 16);
        engine.shutdown(ShutdownMode::Cancel).unwrap();
    }
    let err = Engine::builder()
        .runtime_model(model(), None)
        .kv_pool(KvPoolSize::TokensPerSeq(0))
        .build()
        .unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::InvalidConfig {
                field: "kv_pool",
                ..
            }
        ),
        "{err}"
    );
}
