//! Prefetch on a synthetic persona-transition workload: 12 personas whose next use
//! follows a fixed Markov chain (favourite successor 60%, second 20%, any other 20%),
//! a warm tier of 4, and 3,000 requests. Prints the warm hit rate of requests and
//! the prefetcher's own hit rate for each policy.
//!
//! Run: `cargo run --release -p batos-lora --example prefetch_sim`

use batos_lora::{
    AdapterFiles, AdapterManager, BaseShapes, Expect, LoraPair, LoraWeights, ManagerConfig,
    PrefetchPolicy, Projection,
};
use batos_store::{Db, StoreConfig};
use batos_types::MemoryBudget;

const PERSONAS: usize = 12;
const REQUESTS: usize = 3000;

struct Rng(u64);
impl Rng {
    fn unit(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn tiny() -> BaseShapes {
    BaseShapes {
        model_name: "tiny".into(),
        num_layers: 2,
        hidden: 16,
        intermediate: 32,
        q_dim: 16,
        kv_dim: 8,
    }
}

fn files(seed: usize) -> AdapterFiles {
    let base = tiny();
    let mut w = LoraWeights::empty(base.num_layers);
    for layer in 0..base.num_layers {
        for p in Projection::ALL {
            let (i, o) = base.dims(p);
            let v = |n: usize, k: usize| {
                (0..n)
                    .map(|j| ((j * 31 + k * 7 + seed) % 17) as f32 * 1e-3)
                    .collect()
            };
            let pair = LoraPair {
                rank: 4,
                scale: 2.0,
                a: v(4 * i, 1),
                b: v(o * 4, 2),
            };
            w.insert(layer, p, pair).expect("valid pair");
        }
    }
    let cfg = r#"{"peft_type":"LORA","r":4,"lora_alpha":8,"target_modules":["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"],"base_model_name_or_path":"tiny"}"#;
    AdapterFiles::from_bytes(
        cfg.as_bytes().to_vec(),
        batos_lora::peft::to_safetensors(&w).expect("encodes"),
    )
}

/// The persona sequence: a fixed Markov chain.
fn workload(n: usize, seed: u64) -> Vec<usize> {
    let mut rng = Rng(seed);
    let mut cur = 0usize;
    (0..n)
        .map(|_| {
            let u = rng.unit();
            cur = if u < 0.6 {
                (cur * 5 + 1) % PERSONAS
            } else if u < 0.8 {
                (cur * 7 + 3) % PERSONAS
            } else {
                (rng.unit() * PERSONAS as f64) as usize % PERSONAS
            };
            cur
        })
        .collect()
}

fn run(label: &str, policy: PrefetchPolicy, pretrain: bool) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let db = Db::open(dir.path().join("image"), StoreConfig::default())?;
    let cfg = ManagerConfig {
        max_loras: 2,
        max_cpu_loras: 4,
        prefetch: policy,
        ..ManagerConfig::default()
    };
    let mgr = AdapterManager::open(&db, tiny(), MemoryBudget::new("sim", 1 << 30), cfg)?;
    let names: Vec<String> = (0..PERSONAS).map(|i| format!("persona-{i}")).collect();
    for (i, n) in names.iter().enumerate() {
        mgr.add_files(n, files(i), "sim", Expect::Absent)?;
    }
    if pretrain {
        // "Recorded history": yesterday's traffic from the same chain.
        mgr.learn(workload(REQUESTS, 99).into_iter().map(|i| names[i].clone()));
    }
    for i in workload(REQUESTS, 7) {
        drop(mgr.acquire(&names[i])?);
    }
    let s = mgr.stats();
    println!(
        "{label:<34} request warm hit rate {:>5.1}%  cold loads {:>4}  prefetch issued {:>4} hits {:>4} wasted {:>4} (hit rate {:>5.1}%)",
        100.0 * s.warm_hits as f64 / REQUESTS as f64,
        s.cold_loads,
        s.prefetch.issued,
        s.prefetch.hits,
        s.prefetch.wasted,
        100.0 * s.prefetch.hit_rate()
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    println!("{PERSONAS} personas, warm tier of 4, {REQUESTS} requests");
    run("off", PrefetchPolicy::Off, false)?;
    run(
        "top-1, p >= 0.3, learned online",
        PrefetchPolicy::AfterUse {
            top_k: 1,
            min_probability: 0.3,
        },
        false,
    )?;
    run(
        "top-1, p >= 0.3, from history",
        PrefetchPolicy::AfterUse {
            top_k: 1,
            min_probability: 0.3,
        },
        true,
    )?;
    run(
        "top-2, p >= 0.15, from history",
        PrefetchPolicy::AfterUse {
            top_k: 2,
            min_probability: 0.15,
        },
        true,
    )?;
    Ok(())
}
