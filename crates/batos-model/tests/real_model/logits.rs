//! End-to-end check of the GGUF import (dequantization and the Q/K un-permutation) on the
//! real model: a deliberately naive f32 forward pass over the imported weights, written
//! straight from the HF Llama definition (rotate-half RoPE), must reproduce the reference
//! step-1 logits of every raw prompt in ../shared/reference/base.json. This is an oracle for
//! the loader, independent of batos-kernels; the engine's own conformance lives with the
//! forward pass.

use crate::common::{ids, real_model, reference_json};
use batos_model::{LlamaConfig, LoadOptions, LoadedModel, ModelWeights, Tensor};

fn matvec(w: &Tensor, x: &[f32]) -> Vec<f32> {
    let w = w.as_f32().expect("f32 weights");
    let cols = x.len();
    w.chunks_exact(cols)
        .map(|row| row.iter().zip(x).map(|(a, b)| a * b).sum())
        .collect()
}

fn rms_norm(x: &[f32], w: &Tensor, eps: f32) -> Vec<f32> {
    let w = w.as_f32().unwrap();
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let r = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(v, g)| v * r * g).collect()
}

fn rope(v: &mut [f32], head_dim: usize, pos: usize, theta: f32) {
    let half = head_dim / 2;
    for head in v.chunks_exact_mut(head_dim) {
        for i in 0..half {
            let freq = 1.0 / theta.powf((2 * i) as f32 / head_dim as f32);
            let (s, c) = (pos as f32 * freq).sin_cos();
            let (a, b) = (head[i], head[i + half]);
            head[i] = a * c - b * s;
            head[i + half] = b * c + a * s;
        }
    }
}

/// Logits of the last position of `tokens`.
fn last_logits(cfg: &LlamaConfig, w: &ModelWeights, tokens: &[u32]) -> Vec<f32> {
    let h = cfg.hidden_size;
    let hd = cfg.head_dim;
    let emb = w.embed_tokens().as_f32().unwrap();
    let mut xs: Vec<Vec<f32>> = tokens
        .iter()
        .map(|&t| emb[t as usize * h..(t as usize + 1) * h].to_vec())
        .collect();
    for layer in w.layers() {
        let mut qs = Vec::new();
        let mut ks = Vec::new();
        let mut vs = Vec::new();
        for (pos, x) in xs.iter().enumerate() {
            let n = rms_norm(x, &layer.attn_norm, cfg.rms_norm_eps);
            let mut q = matvec(&layer.q_proj, &n);
            let mut k = matvec(&layer.k_proj, &n);
            rope(&mut q, hd, pos, cfg.rope_theta);
            rope(&mut k, hd, pos, cfg.rope_theta);
            qs.push(q);
            ks.push(k);
            vs.push(matvec(&layer.v_proj, &n));
        }
        for (pos, x) in xs.iter_mut().enumerate() {
            let mut attn = vec![0.0f32; cfg.q_dim()];
            for head in 0..cfg.num_attention_heads {
                let kvh = head / cfg.gqa_group();
                let q = &qs[pos][head * hd..(head + 1) * hd];
                let scores: Vec<f32> = (0..=pos)
                    .map(|j| {
                        let k = &ks[j][kvh * hd..(kvh + 1) * hd];
                        q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() / (hd as f32).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let exps: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f32 = exps.iter().sum();
                for (j, e) in exps.iter().enumerate() {
                    let v = &vs[j][kvh * hd..(kvh + 1) * hd];
                    for (o, vv) in attn[head * hd..(head + 1) * hd].iter_mut().zip(v) {
                        *o += e / sum * vv;
                    }
                }
            }
            let o = matvec(&layer.o_proj, &attn);
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            let n = rms_norm(x, &layer.mlp_norm, cfg.rms_norm_eps);
            let g = matvec(&layer.gate_proj, &n);
            let u = matvec(&layer.up_proj, &n);
            let act: Vec<f32> = g
                .iter()
                .zip(&u)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let d = matvec(&layer.down_proj, &act);
            x.iter_mut().zip(&d).for_each(|(a, b)| *a += b);
        }
    }
    let last = rms_norm(xs.last().unwrap(), w.norm(), cfg.rms_norm_eps);
    matvec(w.lm_head(), &last)
}

#[test]
fn gguf_import_reproduces_reference_step1_logits() {
    let (Some(path), Some(base)) = (
        real_model("gguf_import_reproduces_reference_step1_logits"),
        reference_json("gguf_import_reproduces_reference_step1_logits", "base.json"),
    ) else {
        return;
    };
    let model = LoadedModel::from_gguf(&path, &LoadOptions::default()).unwrap();
    let (cfg, weights, tok) = (&model.config, &model.weights, &model.tokenizer);
    assert!(weights.is_tied());
    for p in base["prompts"].as_array().unwrap() {
        let input = ids(&p["input_ids"]);
        if p["prompt_kind"] == "raw" {
            assert_eq!(
                tok.encode_prompt(p["prompt_text"].as_str().unwrap())
                    .unwrap(),
                input
            );
        }
        let logits = last_logits(cfg, weights, &input);
        assert_eq!(logits.len(), cfg.vocab_size);
        let want_ids = ids(&p["step1_top10"]["ids"]);
        let want_vals: Vec<f64> = p["step1_top10"]["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        let got_ids: Vec<u32> = order[..10].iter().map(|&i| i as u32).collect();
        assert_eq!(got_ids, want_ids, "top-10 ids, prompt {}", p["name"]);
        for (id, want) in want_ids.iter().zip(&want_vals) {
            let got = logits[*id as usize] as f64;
            assert!(
                (got - want).abs() < 1e-3,
                "prompt {}: logit of {id} is {got}, reference {want}",
                p["name"]
            );
        }
    }
}
