//! The paged, batched forward pass against a naive dense forward written here from the
//! definition of the Llama architecture (full-sequence causal attention, no cache, f64).

use batos_model::forward::{ForwardBatch, LlamaDims, LogitsRows, SeqStep, WeightDType};
use batos_model::synthetic::{tiny_params, SyntheticLlama};
use batos_model::LlamaConfig;
use batos_types::BlockId;

mod forward_common;
use forward_common::{tokens, TestCache};

/// Logits of every position of `tokens`, computed densely in f64.
fn dense_forward(m: &SyntheticLlama, tokens: &[u32]) -> Vec<Vec<f64>> {
    let c = &m.config;
    let (hid, nh, nkv, hd, ffn) = (
        c.hidden_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim,
        c.intermediate_size,
    );
    let t = tokens.len();
    let eps = c.rms_norm_eps as f64;
    let rms = |x: &[f64], w: &[f32]| -> Vec<f64> {
        let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
        let inv = 1.0 / (ms + eps).sqrt();
        x.iter().zip(w).map(|(v, &w)| v * inv * w as f64).collect()
    };
    let linear = |x: &[f64], w: &[f32], out: usize| -> Vec<f64> {
        let inp = x.len();
        (0..out)
            .map(|o| (0..inp).map(|i| x[i] * w[o * inp + i] as f64).sum())
            .collect()
    };
    let rope = |v: &mut [f64], pos: usize| {
        for head in v.chunks_exact_mut(hd) {
            for i in 0..hd / 2 {
                let inv_freq = (c.rope_theta as f64).powf(-((2 * i) as f64) / hd as f64);
                let (sin, cos) = (pos as f64 * inv_freq).sin_cos();
                let (a, b) = (head[i], head[i + hd / 2]);
                head[i] = a * cos - b * sin;
                head[i + hd / 2] = b * cos + a * sin;
            }
        }
    };
    let mut x: Vec<Vec<f64>> = tokens
        .iter()
        .map(|&tok| {
            let r = tok as usize * hid;
            m.embed_tokens[r..r + hid]
                .iter()
                .map(|&v| v as f64)
                .collect()
        })
        .collect();
    for l in &m.layers {
        let mut qs = Vec::with_capacity(t);
        let mut ks = Vec::with_capacity(t);
        let mut vs = Vec::with_capacity(t);
        for (pos, xi) in x.iter().enumerate() {
            let h = rms(xi, &l.input_layernorm);
            let mut q = linear(&h, &l.q_proj, nh * hd);
            let mut k = linear(&h, &l.k_proj, nkv * hd);
            rope(&mut q, pos);
            rope(&mut k, pos);
            qs.push(q);
            ks.push(k);
            vs.push(linear(&h, &l.v_proj, nkv * hd));
        }
        for i in 0..t {
            let mut attn = vec![0.0f64; nh * hd];
            for h in 0..nh {
                let kvh = h / (nh / nkv);
                let q = &qs[i][h * hd..(h + 1) * hd];
                let scores: Vec<f64> = (0..=i)
                    .map(|j| {
                        let k = &ks[j][kvh * hd..(kvh + 1) * hd];
                        q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>() / (hd as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = exps.iter().sum();
                for (j, e) in exps.iter().enumerate() {
                    let v = &vs[j][kvh * hd..(kvh + 1) * hd];
                    for (o, vv) in attn[h * hd..(h + 1) * hd].iter_mut().zip(v) {
                        *o += e / sum * vv;
                    }
                }
            }
            let o = linear(&attn, &l.o_proj, hid);
            for (a, b) in x[i].iter_mut().zip(&o) {
                *a += b;
            }
            let h = rms(&x[i], &l.post_attention_layernorm);
            let g = linear(&h, &l.gate_proj, ffn);
            let u = linear(&h, &l.up_proj, ffn);
            let act: Vec<f64> = g
                .iter()
                .zip(&u)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let down = linear(&act, &l.down_proj, hid);
            for (a, b) in x[i].iter_mut().zip(&down) {
                *a += b;
            }
        }
    }
    let head = m.lm_head.as_ref().unwrap_or(&m.embed_tokens);
    x.iter()
        .map(|xi| linear(&rms(xi, &m.norm), head, c.vocab_size))
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&a, &b)| (a as f64 - b).abs())
        .fold(0.0, f64::max)
}

/// Chunked prefill then single-token decode, over scattered blocks, matches the dense
/// forward of the whole sequence at every position within 1e-4.
#[test]
fn chunked_prefill_and_decode_match_dense_reference() {
    for tie in [true, false] {
        let mut params = tiny_params();
        params.tie_word_embeddings = tie;
        let synth = SyntheticLlama::new(LlamaConfig::new(params).unwrap(), 7);
        let model = synth.model(WeightDType::F32).unwrap();
        let d = *model.dims();
        let block_size = 4;
        let mut cache = TestCache::new(&d, 32, block_size);
        let all = tokens(45, 3, d.vocab_size);
        let reference = dense_forward(&synth, &all);
        // Deliberately scattered, non-monotonic blocks.
        let table: Vec<BlockId> = [17, 3, 30, 8, 0, 22, 5, 11, 29, 14, 2, 26]
            .into_iter()
            .map(BlockId)
            .collect();
        let prompt_len = 37;
        let mut done = 0;
        let mut worst = 0.0f64;
        for chunk in [5usize, 8, 1, 16, 7] {
            let step = SeqStep::new(all[done..done + chunk].to_vec(), done, table.clone())
                .with_logits(LogitsRows::All);
            let out = model
                .forward(&ForwardBatch::new(vec![step]), &mut cache)
                .unwrap();
            assert_eq!(out.num_rows(), chunk);
            for (i, row) in out.seq_logits(0).enumerate() {
                worst = worst.max(max_abs_diff(row, &reference[done + i]));
            }
            done += chunk;
        }
        assert_eq!(done, prompt_len);
        while done < all.len() {
            let step = SeqStep::new(vec![all[done]], done, table.clone());
            let out = model
                .forward(&ForwardBatch::new(vec![step]), &mut cache)
                .unwrap();
            worst = worst.max(max_abs_diff(out.last_logits(0).unwrap(), &reference[done]));
            done += 1;
        }
        assert!(worst < 1e-4, "tied={tie}: max |paged - dense| = {worst}");
    }
}

/// Sequences in one step, each asking for all, the last or no logits rows, give the
/// rows each gives computed on its own, and the dense reference's; a later decode
/// step shows the K/V of rows without logits were written all the same.
#[test]
fn mixed_step_rows_equal_solo_rows() {
    let synth = SyntheticLlama::new(LlamaConfig::new(tiny_params()).unwrap(), 11);
    let model = synth.model(WeightDType::F32).unwrap();
    let d = *model.dims();
    let lens = [9usize, 1, 20, 4, 6];
    let modes = [
        LogitsRows::All,
        LogitsRows::Last,
        LogitsRows::None,
        LogitsRows::All,
        LogitsRows::Last,
    ];
    let prompts: Vec<Vec<u32>> = lens
        .iter()
        .enumerate()
        .map(|(i, &n)| tokens(n + 1, i as u32 + 1, d.vocab_size))
        .collect();
    let tables: Vec<Vec<BlockId>> = (0..5u32)
        .map(|s| (0..6).map(|b| BlockId(s * 6 + b)).collect())
        .collect();
    let step = |s: usize, n: usize, from: usize, logits| {
        SeqStep::new(prompts[s][from..from + n].to_vec(), from, tables[s].clone())
            .with_logits(logits)
    };

    let mut mixed_cache = TestCache::new(&d, 30, 4);
    let batch = ForwardBatch::new((0..5).map(|s| step(s, lens[s], 0, modes[s])).collect());
    let mixed = model.forward(&batch, &mut mixed_cache).unwrap();
    // All 9, last 1, none, all 4, last 1.
    assert_eq!(mixed.num_rows(), 15);
    // One more token each, in one decode step over the cache the prefill filled.
    let decode = ForwardBatch::new(
        (0..5)
            .map(|s| step(s, 1, lens[s], LogitsRows::Last))
            .collect(),
    );
    let decoded = model.forward(&decode, &mut mixed_cache).unwrap();

    for s in 0..5 {
        let mut solo_cache = TestCache::new(&d, 30, 4);
        let solo = model
            .forward(
                &ForwardBatch::new(vec![step(s, lens[s], 0, modes[s])]),
                &mut solo_cache,
            )
            .unwrap();
        let reference = dense_forward(&synth, &prompts[s]);
        let first = match modes[s] {
            LogitsRows::All => 0,
            _ => lens[s] - 1,
        };
        assert_eq!(mixed.seq_logits(s).len(), solo.seq_logits(0).len());
        for (i, (a, b)) in mixed.seq_logits(s).zip(solo.seq_logits(0)).enumerate() {
            let diff = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0f32, f32::max);
            assert!(
                diff < 1e-5,
                "seq {s} row {i}: mixed vs solo differ by {diff}"
            );
            assert!(max_abs_diff(a, &reference[first + i]) < 1e-4);
        }
        let last = decoded.last_logits(s).unwrap();
        assert!(
            max_abs_diff(last, &reference[lens[s]]) < 1e-4,
            "seq {s}: decode after a {:?} prefill",
            modes[s]
        );
    }
}

/// Weights stored as f16 or bf16 stay close to the f32 model (same math, rounded weights).
#[test]
fn half_precision_weights_stay_close() {
    let synth = SyntheticLlama::new(LlamaConfig::new(tiny_params()).unwrap(), 5);
    let d = LlamaDims::from_config(&synth.config);
    let prompt = tokens(12, 9, d.vocab_size);
    let table: Vec<BlockId> = (0..4).map(BlockId).collect();
    let run = |dtype| {
        let model = synth.model(dtype).unwrap();
        let mut cache = TestCache::new(&d, 4, 4);
        let step = SeqStep::new(prompt.clone(), 0, table.clone());
        model
            .forward(&ForwardBatch::new(vec![step]), &mut cache)
            .unwrap()
            .logits
    };
    let full = run(WeightDType::F32);
    for (dtype, tol) in [(WeightDType::F16, 0.05f32), (WeightDType::BF16, 0.3)] {
        let half = run(dtype);
        let diff = full
            .iter()
            .zip(&half)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(diff < tol, "{dtype:?}: max logit diff {diff} >= {tol}");
        assert!(diff > 0.0, "{dtype:?}: weights were not actually rounded");
    }
}
