//! Minimum and median timings of the CPU kernels under each thread backend, interleaved in
//! rounds. On a machine shared with other jobs the minimum is the most repeatable
//! statistic (criterion's means drift with the neighbours' load); see
//! docs/perf/kernels.md.
//!
//! `cargo run --release -p batos-kernels --example min_time`

use batos_kernels::cpu::{self, ThreadBackend};
use batos_kernels::{AttentionHeads, KvCache, KvCacheLayout, SeqAttention, WeightView};
use batos_types::BlockId;
use half::f16;
use std::time::Instant;

fn data(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i + seed) * 7919 % 1000) as f32) / 1000.0 - 0.5)
        .collect()
}

fn samples(reps: usize, f: &mut dyn FnMut(), into: &mut Vec<f64>) {
    for _ in 0..reps {
        let t = Instant::now();
        f();
        into.push(t.elapsed().as_secs_f64());
    }
}

type Case = (String, usize, Box<dyn FnMut()>);

fn matmul_case(n: usize, k: usize, t: usize) -> Case {
    let w: Vec<f16> = data(n * k, 1).iter().map(|&v| f16::from_f32(v)).collect();
    let x = data(t * k, 2);
    let mut out = vec![0.0f32; t * n];
    let f = move || {
        let view = WeightView::f16(&w, n, k).expect("shape");
        cpu::matmul(&x, &view, &mut out).expect("matmul");
    };
    (
        format!("matmul_f16 {n}x{k} t={t} (L3-resident)"),
        50,
        Box::new(f),
    )
}

/// All 210 linear layers of SmolLM2-135M at T = 1, distinct f16 weights (212 MB):
/// the DRAM-bound matmul share of one decode step.
fn stack_case() -> Case {
    let layer = [
        (576, 576),
        (192, 576),
        (192, 576),
        (576, 576),
        (1536, 576),
        (1536, 576),
        (576, 1536),
    ];
    let weights: Vec<Vec<f16>> = (0..210)
        .map(|i| {
            let (n, k) = layer[i % 7];
            data(n * k, i).iter().map(|&v| f16::from_f32(v)).collect()
        })
        .collect();
    let mb: usize = weights.iter().map(|w| w.len() * 2).sum::<usize>() >> 20;
    let x = data(1536, 0);
    let mut out = vec![0.0f32; 1536];
    let f = move || {
        for (i, w) in weights.iter().enumerate() {
            let (n, k) = layer[i % 7];
            let view = WeightView::f16(w, n, k).expect("shape");
            cpu::matmul(&x[..k], &view, &mut out[..n]).expect("matmul");
        }
    };
    (
        format!("210 layer matvecs t=1 ({mb} MiB f16)"),
        8,
        Box::new(f),
    )
}

fn attention_case(seqs: usize, ctx: usize, q_len: usize) -> Case {
    let heads = AttentionHeads::new(9, 3, 64).expect("heads");
    let layout = KvCacheLayout::new(16, 3, 64).expect("layout");
    let per = ctx.div_ceil(16);
    let k = data(seqs * per * layout.block_stride(), 3);
    let v = data(seqs * per * layout.block_stride(), 4);
    let tables: Vec<Vec<BlockId>> = (0..seqs)
        .map(|s| (0..per).map(|b| BlockId((b * seqs + s) as u32)).collect())
        .collect();
    let q = data(seqs * q_len * heads.q_width(), 5);
    let mut out = vec![0.0f32; q.len()];
    let f = move || {
        let batch: Vec<SeqAttention<'_>> = tables
            .iter()
            .enumerate()
            .map(|(i, t)| SeqAttention {
                block_table: t,
                context_len: ctx,
                query_start: i * q_len,
                query_len: q_len,
            })
            .collect();
        let cache = KvCache {
            k: &k,
            v: &v,
            layout,
        };
        cpu::paged_attention(&q, &heads, &cache, &batch, &mut out).expect("attention");
    };
    (
        format!("attention seqs={seqs} ctx={ctx} q={q_len}"),
        10,
        Box::new(f),
    )
}

fn main() {
    let backends = [
        ("serial", ThreadBackend::Serial),
        ("rayon", ThreadBackend::Rayon),
        ("spinpool", ThreadBackend::SpinPool),
    ];
    let mut cases: Vec<Case> = vec![
        matmul_case(192, 576, 1),
        matmul_case(1536, 576, 1),
        matmul_case(1536, 576, 128),
        matmul_case(576, 1536, 512),
        stack_case(),
        attention_case(16, 512, 1),
        attention_case(1, 512, 512),
    ];
    println!("implementation: {}", cpu::implementation());
    let mut all: Vec<[Vec<f64>; 3]> = (0..cases.len()).map(|_| Default::default()).collect();
    for _round in 0..3 {
        for (ci, (_, reps, f)) in cases.iter_mut().enumerate() {
            for (bi, (_, b)) in backends.iter().enumerate() {
                cpu::set_thread_backend(*b);
                samples(*reps, &mut **f, &mut all[ci][bi]);
            }
        }
    }
    println!(
        "{:44} {:>22} {:>22} {:>22}",
        "case: min / median", "serial", "rayon", "spinpool"
    );
    for (ci, (name, _, _)) in cases.iter().enumerate() {
        let cols: Vec<String> = all[ci]
            .iter_mut()
            .map(|v| {
                v.sort_by(f64::total_cmp);
                format!("{:.1} / {:.1} us", v[0] * 1e6, v[v.len() / 2] * 1e6)
            })
            .collect();
        println!("{name:44} {:>22} {:>22} {:>22}", cols[0], cols[1], cols[2]);
    }
}
