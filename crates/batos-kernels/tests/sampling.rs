//! Sampling: validation, seeded reproducibility, filter masks, penalty semantics and
//! log-probabilities.

use batos_kernels::sampling::{
    apply_penalties, filtered_probs, log_softmax, top_n, Sampler, SamplingParams, TokenHistory,
};
use batos_kernels::KernelError;
use proptest::prelude::*;

fn logits() -> Vec<f32> {
    vec![1.0, 3.0, 2.5, -1.0, 0.5, 2.9, -4.0, 0.0]
}

#[test]
fn invalid_params_are_typed_errors() {
    let cases = [
        SamplingParams {
            temperature: -0.1,
            ..Default::default()
        },
        SamplingParams {
            temperature: f32::NAN,
            ..Default::default()
        },
        SamplingParams {
            top_p: 0.0,
            ..Default::default()
        },
        SamplingParams {
            top_p: 1.5,
            ..Default::default()
        },
        SamplingParams {
            top_k: Some(0),
            ..Default::default()
        },
        SamplingParams {
            min_p: 1.1,
            ..Default::default()
        },
        SamplingParams {
            repetition_penalty: 0.0,
            ..Default::default()
        },
        SamplingParams {
            presence_penalty: 2.5,
            ..Default::default()
        },
        SamplingParams {
            frequency_penalty: -3.0,
            ..Default::default()
        },
    ];
    for p in cases {
        assert!(
            matches!(
                Sampler::new(p.clone()),
                Err(KernelError::InvalidSamplingParam { .. })
            ),
            "{p:?} accepted"
        );
    }
    assert!(Sampler::new(SamplingParams::default()).is_ok());
}

#[test]
fn bad_logits_and_history_are_typed_errors() {
    let mut s = Sampler::new(SamplingParams::greedy()).unwrap();
    assert!(s.sample(&[], &TokenHistory::default()).is_err());
    assert!(s
        .sample(&[f32::NAN, f32::NEG_INFINITY], &TokenHistory::default())
        .is_err());
    let history = TokenHistory {
        prompt: &[9],
        output: &[],
    };
    assert!(matches!(
        s.sample(&logits(), &history),
        Err(KernelError::TokenOutOfRange { id: 9, .. })
    ));
}

#[test]
fn greedy_is_argmax() {
    let mut s = Sampler::new(SamplingParams::greedy()).unwrap();
    assert_eq!(
        s.sample(&logits(), &TokenHistory::default()).unwrap().token,
        1
    );
}

#[test]
fn same_seed_same_tokens_different_seed_differs() {
    let params = |seed| SamplingParams {
        temperature: 1.5,
        seed: Some(seed),
        ..Default::default()
    };
    let draw = |seed| {
        let mut s = Sampler::new(params(seed)).unwrap();
        (0..64)
            .map(|_| s.sample(&logits(), &TokenHistory::default()).unwrap().token)
            .collect::<Vec<_>>()
    };
    assert_eq!(draw(42), draw(42));
    assert_ne!(draw(42), draw(43));
}

#[test]
fn top_k_only_ever_yields_the_k_best() {
    let mut s = Sampler::new(SamplingParams {
        top_k: Some(2),
        temperature: 5.0,
        seed: Some(1),
        ..Default::default()
    })
    .unwrap();
    let mut seen = [0usize; 8];
    for _ in 0..500 {
        seen[s.sample(&logits(), &TokenHistory::default()).unwrap().token as usize] += 1;
    }
    // Tokens 1 (3.0) and 5 (2.9) are the two largest.
    assert!(seen[1] > 0 && seen[5] > 0);
    assert_eq!(seen.iter().sum::<usize>(), seen[1] + seen[5]);
}

#[test]
fn top_p_keeps_the_smallest_sufficient_set() {
    let l = logits();
    let p = SamplingParams {
        top_p: 0.5,
        ..Default::default()
    };
    let probs = filtered_probs(&l, &p);
    let full = filtered_probs(&l, &SamplingParams::default());
    // Sorted: token 1 (.31), 5 (.28), 2 (.19) ... ; .31 < .5 <= .31 + .28.
    let kept: Vec<usize> = (0..8).filter(|&i| probs[i] > 0.0).collect();
    assert_eq!(kept, vec![1, 5]);
    let renorm = full[1] + full[5];
    assert!((probs[1] - full[1] / renorm).abs() < 1e-6);
    assert!((probs.iter().sum::<f32>() - 1.0).abs() < 1e-6);
}

#[test]
fn min_p_drops_unlikely_tokens() {
    let l = logits();
    let full = filtered_probs(&l, &SamplingParams::default());
    let probs = filtered_probs(
        &l,
        &SamplingParams {
            min_p: 0.3,
            ..Default::default()
        },
    );
    let top = full.iter().copied().fold(0.0, f32::max);
    for i in 0..8 {
        assert_eq!(probs[i] > 0.0, full[i] >= 0.3 * top, "token {i}");
    }
}

#[test]
fn penalties_follow_vllm_semantics() {
    let mut l = vec![2.0f32, -2.0, 1.0, 1.0];
    let p = SamplingParams {
        repetition_penalty: 2.0,
        presence_penalty: 0.5,
        frequency_penalty: 0.25,
        ..Default::default()
    };
    // Token 0 in the prompt only; 1 in the output twice; 2 untouched; 3 in output once.
    let history = TokenHistory {
        prompt: &[0, 0],
        output: &[1, 1, 3],
    };
    apply_penalties(&mut l, &p, &history).unwrap();
    // Repetition: positive divided, negative multiplied, prompt and output alike;
    // presence/frequency from output counts only.
    assert_eq!(l[0], 1.0);
    assert_eq!(l[1], -4.0 - 0.25 * 2.0 - 0.5);
    assert_eq!(l[2], 1.0);
    assert_eq!(l[3], 0.5 - 0.25 - 0.5);
}

#[test]
fn logprobs_are_raw_log_softmax_and_sorted() {
    let l = logits();
    let mut s = Sampler::new(SamplingParams {
        logprobs: Some(3),
        repetition_penalty: 1.5,
        seed: Some(3),
        ..Default::default()
    })
    .unwrap();
    let out = s
        .sample(
            &l,
            &TokenHistory {
                prompt: &[1],
                output: &[],
            },
        )
        .unwrap();
    let lp = log_softmax(&l);
    assert_eq!(out.logprob, lp[out.token as usize]);
    let ids: Vec<u32> = out.top_logprobs.iter().map(|t| t.token).collect();
    assert_eq!(ids, vec![1, 5, 2]);
    let total: f64 = lp.iter().map(|&v| (v as f64).exp()).sum();
    assert!((total - 1.0).abs() < 1e-6);
    assert_eq!(top_n(&lp, 100).len(), 8);
}

proptest! {
    #[test]
    fn filtered_probs_are_a_distribution_within_the_masks(
        l in proptest::collection::vec(-20.0f32..20.0, 1..64),
        k in 1usize..10,
        top_p in 0.05f32..=1.0,
        min_p in 0.0f32..0.9,
        t in 0.1f32..3.0,
    ) {
        let p = SamplingParams { temperature: t, top_k: Some(k), top_p, min_p, ..Default::default() };
        let probs = filtered_probs(&l, &p);
        let kept = probs.iter().filter(|&&v| v > 0.0).count();
        prop_assert!(kept >= 1 && kept <= k);
        prop_assert!((probs.iter().sum::<f32>() - 1.0).abs() < 1e-4);
        // The arg-max always survives.
        let best = l.iter().enumerate().fold(0, |b, (i, &v)| if v > l[b] { i } else { b });
        prop_assert!(probs[best] > 0.0);
    }

    #[test]
    fn seeded_sampling_is_reproducible(seed in any::<u64>(), l in proptest::collection::vec(-5.0f32..5.0, 2..40)) {
        let p = SamplingParams { seed: Some(seed), top_p: 0.9, ..Default::default() };
        let (mut a, mut b) = (Sampler::new(p.clone()).unwrap(), Sampler::new(p).unwrap());
        for _ in 0..8 {
            let h = TokenHistory::default();
            prop_assert_eq!(a.sample(&l, &h).unwrap(), b.sample(&l, &h).unwrap());
        }
    }
}
