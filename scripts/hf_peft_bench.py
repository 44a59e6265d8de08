#!/usr/bin/env python3
"""Hugging Face transformers + PEFT decode bench, the peer of batos' bench-cuda_forward.

Builds LlamaForCausalLM from a config (SmolLM2-135M's by default:
/work/shared/reference/hf_model_summary.json, or a copy in the device bundle) with
random weights -- the same shapes as the batos bench's synthetic model; speed does not
depend on the values -- and measures greedy decode tok/s, f16, eager PyTorch:

  - batch 1 / 16 / 64 without adapters (the plain model: before PEFT wraps it, or
    after `unload()` removed PEFT's layers again);
  - batch 16 with 16 distinct random rank-16 LoRA adapters on all seven projections,
    one per sequence, through PEFT's mixed-batch `adapter_names=` forward argument.

Each measurement: a 32-token prompt per sequence (prefill, not timed), one warm-up
decode step, then 32 timed decode steps with the KV cache (argmax of the last logits
fed back), torch.cuda.synchronize() around the timer; median of --runs. The same
lengths as bench-cuda_forward.

Prints a table and one machine-readable line: `HF_BENCH {json}`. With --compare FILE
(the batos bench's output), also prints the batos / HF ratio for every configuration
both measured, from the `BATOS_BENCH {json}` line of the synthetic f16 model.

    python3 scripts/hf_peft_bench.py --config .gpu-bin/hf_model_summary.json
    python3 scripts/hf_peft_bench.py --dry-run        # parse and plan only, no torch

Exit status: 0 on success, 2 when torch / transformers / peft are missing (a clear
message, not a traceback), 1 on any other failure.
"""

import argparse
import inspect
import json
import re
import statistics
import sys
import time

DEFAULT_CONFIG = "/work/shared/reference/hf_model_summary.json"
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIG_KEYS = [
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
    "rope_theta",
    "rms_norm_eps",
    "tie_word_embeddings",
]
# A tiny model for testing the plumbing on a CPU (--tiny).
TINY = {
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 256,
    "max_position_embeddings": 512,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=DEFAULT_CONFIG, help="HF config.json or hf_model_summary.json")
    p.add_argument("--tiny", action="store_true", help="use a tiny model (plumbing test)")
    p.add_argument("--device", default="cuda", help="torch device (cuda, cuda:N, cpu)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--batches", default="1,16,64", help="batch sizes without adapters")
    p.add_argument("--mixed-batches", default="16", help="batch sizes with mixed adapters")
    p.add_argument("--adapters", type=int, default=16, help="distinct adapters in a mixed batch")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens per sequence")
    p.add_argument("--decode", type=int, default=32, help="timed decode steps")
    p.add_argument("--runs", type=int, default=3, help="runs per configuration (median)")
    p.add_argument("--mixed-decode", type=int, default=8,
                   help="timed decode steps with mixed adapters (PEFT's per-adapter loop is slow)")
    p.add_argument("--mixed-runs", type=int, default=1, help="runs with mixed adapters")
    p.add_argument("--budget-s", type=float, default=0.0,
                   help="stop starting new runs after this many seconds (0: no limit)")
    p.add_argument("--compare", metavar="FILE", help="batos bench output with BATOS_BENCH lines")
    p.add_argument("--dry-run", action="store_true", help="parse and print the plan; no torch")
    args = p.parse_args(argv)
    args.batches = parse_list(args.batches, "--batches")
    args.mixed_batches = parse_list(args.mixed_batches, "--mixed-batches")
    for name in ("adapters", "rank", "prompt", "decode", "runs", "mixed_decode", "mixed_runs"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    return args


def parse_list(text, flag):
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"hf_peft_bench: {flag} must be a comma list of integers, got {text!r}")
    if any(v < 1 for v in vals):
        raise SystemExit(f"hf_peft_bench: {flag} values must be >= 1, got {text!r}")
    return vals


def load_config(path, tiny):
    """The model fields LlamaConfig needs, from a config.json or hf_model_summary.json."""
    if tiny:
        return dict(TINY)
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"hf_peft_bench: cannot read the model config {path}: {e}")
    missing = [k for k in CONFIG_KEYS if k not in raw]
    if missing:
        raise SystemExit(f"hf_peft_bench: {path} lacks {', '.join(missing)}")
    cfg = {k: raw[k] for k in CONFIG_KEYS}
    for k in CONFIG_KEYS:
        if k not in ("rope_theta", "rms_norm_eps", "tie_word_embeddings"):
            if not isinstance(cfg[k], int) or cfg[k] < 1:
                raise SystemExit(f"hf_peft_bench: {path}: {k} = {cfg[k]!r} is not a positive integer")
    if cfg["num_attention_heads"] % cfg["num_key_value_heads"]:
        raise SystemExit(f"hf_peft_bench: {path}: query heads not a multiple of KV heads")
    return cfg


def plan(args):
    """Every configuration measured, in order: (batch, adapters)."""
    return [(b, 0) for b in args.batches] + [(b, args.adapters) for b in args.mixed_batches]


def n_params(cfg):
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    layer = h * (q + 2 * kv) + q * h + 3 * h * f + 2 * h
    head = 0 if cfg["tie_word_embeddings"] else v * h
    return cfg["num_hidden_layers"] * layer + v * h + head + h


def import_torch():
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
        import peft  # noqa: F401
    except ImportError as e:
        print(
            f"hf_peft_bench: needs torch, transformers and peft ({e}); this machine lacks them. "
            "Run it on the device machine, or use --dry-run here.",
            file=sys.stderr,
        )
        sys.exit(2)
    return torch, transformers, peft


def build_model(torch, transformers, cfg, device, dtype):
    # transformers 5 keeps rope_theta inside rope_parameters; 4.x takes it directly.
    params = inspect.signature(transformers.LlamaConfig.__init__).parameters
    if "rope_parameters" in params:
        rope = {"rope_parameters": {"rope_type": "default", "rope_theta": cfg["rope_theta"]}}
    else:
        rope = {"rope_theta": cfg["rope_theta"]}
    config = transformers.LlamaConfig(
        **rope,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_key_value_heads"],
        head_dim=cfg["head_dim"],
        max_position_embeddings=cfg["max_position_embeddings"],
        rms_norm_eps=cfg["rms_norm_eps"],
        tie_word_embeddings=cfg["tie_word_embeddings"],
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config)
    return model.to(dtype).eval()


def decode_tok_s(torch, model, cfg, batch, args, adapter_names=None, steps=None):
    """Prefill a prompt, one warm-up step, then `steps` (default args.decode) timed
    greedy steps."""
    steps = steps or args.decode
    gen = torch.Generator(device="cpu").manual_seed(batch)
    ids = torch.randint(0, cfg["vocab_size"], (batch, args.prompt), generator=gen).to(args.device)
    extra = {} if adapter_names is None else {"adapter_names": adapter_names}
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True, **extra)
        past = out.past_key_values
        nxt = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)

        def step(nxt, past):
            out = model(input_ids=nxt, past_key_values=past, use_cache=True, **extra)
            return out.logits[:, -1, :].argmax(dim=-1, keepdim=True), out.past_key_values

        nxt, past = step(nxt, past)
        sync()
        t = time.perf_counter()
        for _ in range(steps):
            nxt, past = step(nxt, past)
        sync()
        return batch * steps / (time.perf_counter() - t)


def add_adapters(torch, peft, model, args):
    """Wraps `model` in PEFT with args.adapters random rank-args.rank adapters."""
    lcfg = dict(
        r=args.rank,
        lora_alpha=2 * args.rank,
        target_modules=PROJECTIONS,
        lora_dropout=0.0,
        bias="none",
        init_lora_weights=False,  # random A and B: a real (non-zero) update
    )
    names = [f"a{i}" for i in range(args.adapters)]
    torch.manual_seed(1)
    pm = peft.get_peft_model(model, peft.LoraConfig(**lcfg), adapter_name=names[0])
    for n in names[1:]:
        pm.add_adapter(n, peft.LoraConfig(**lcfg))
    # Match the model's dtype and device (adapters are created in f32 on some versions).
    dtype = next(model.parameters()).dtype
    pm = pm.to(device=args.device, dtype=dtype).eval()
    return pm, names


def find_batos(path):
    """The synthetic f16 model's BATOS_BENCH record in a batos bench output, or None."""
    try:
        text = open(path, errors="replace").read()
    except OSError as e:
        print(f"hf_peft_bench: --compare: cannot read {path}: {e}", file=sys.stderr)
        return None
    best = None
    for m in re.finditer(r"^BATOS_BENCH (\{.*\})\s*$", text, re.M):
        try:
            rec = json.loads(m.group(1))
        except ValueError:
            continue
        label = rec.get("model", "")
        if "synthetic" in label and "f16" in label:
            best = rec
    return best


def compare(batos, hf):
    """Rows (batch, adapters, batos tok/s, hf tok/s, ratio) for configurations both ran."""
    theirs = {(r["batch"], r["adapters"]): r["tok_s"] for r in hf["decode"]}
    rows = []
    for r in batos.get("decode", []):
        key = (r["batch"], r["adapters"])
        if key in theirs and theirs[key] > 0:
            rows.append((r["batch"], r["adapters"], r["tok_s"], theirs[key], r["tok_s"] / theirs[key]))
    return rows


def main(argv):
    args = parse_args(argv)
    cfg = load_config(args.config, args.tiny)
    todo = plan(args)
    print(
        f"hf_peft_bench: {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, "
        f"{cfg['num_attention_heads']}/{cfg['num_key_value_heads']} heads of {cfg['head_dim']}, "
        f"MLP {cfg['intermediate_size']}, vocab {cfg['vocab_size']}, ~{n_params(cfg) / 1e6:.1f} M params; "
        f"{args.dtype} on {args.device}; prompt {args.prompt}, {args.decode} timed steps, "
        f"median of {args.runs}; plan (batch, adapters): {todo}"
    )
    if args.dry_run:
        print("HF_BENCH_PLAN " + json.dumps({"config": cfg, "plan": todo}))
        return 0
    torch, transformers, peft = import_torch()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("hf_peft_bench: no CUDA device visible to torch", file=sys.stderr)
        return 1
    started = time.perf_counter()
    over = lambda: args.budget_s > 0 and time.perf_counter() - started > args.budget_s  # noqa: E731
    dtype = getattr(torch, args.dtype)
    model = build_model(torch, transformers, cfg, args.device, dtype)
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    print(f"device {name}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"peft {peft.__version__}, model built in {time.perf_counter() - started:.1f} s")
    rows, skipped = [], []

    def measure(model, batch, n, names):
        runs, steps = (args.mixed_runs, args.mixed_decode) if n else (args.runs, None)
        tps = []
        for _ in range(runs):
            if tps and over():
                break
            tps.append(decode_tok_s(torch, model, cfg, batch, args, names, steps))
        return statistics.median(tps), len(tps)

    print("\n| batch | adapters | HF decode tok/s | runs |\n|---|---|---|---|")

    def base(model, batch):
        if over():
            skipped.append((batch, 0))
            return
        tps, runs = measure(model, batch, 0, None)
        rows.append({"batch": batch, "adapters": 0, "tok_s": tps, "runs": runs})
        print(f"| {batch} | 0 | {tps:.1f} | {runs} |", flush=True)

    # Every base figure first (they are quick), then the mixed batches: PEFT's
    # per-adapter loop makes those slow, so a spent budget cuts only them.
    mixed = [(b, n) for b, n in todo if n]
    first = [b for b, n in todo if not n]
    for batch in first:
        base(model, batch)
    if mixed and not over():
        t = time.perf_counter()
        pm, names = add_adapters(torch, peft, model, args)
        print(f"({args.adapters} r{args.rank} adapters added in {time.perf_counter() - t:.1f} s)")
        for batch, n in mixed:
            if over():
                skipped.append((batch, n))
                continue
            per_seq = [names[i % len(names)] for i in range(batch)]
            tps, runs = measure(pm, batch, n, per_seq)
            used = min(batch, len(names))
            rows.append({"batch": batch, "adapters": used, "tok_s": tps, "runs": runs})
            print(f"| {batch} | {used} (mixed, {args.mixed_decode} timed steps) | {tps:.1f} | {runs} |",
                  flush=True)
        # Back to the plain model: PEFT's LoRA layers removed, nothing merged.
        model = pm.unload()
    else:
        skipped.extend(mixed)
    for batch, n in todo:
        if not n and batch not in first:
            base(model, batch)
    if skipped:
        print(f"hf_peft_bench: budget of {args.budget_s:.0f} s spent; skipped {skipped}")
    record = {
        "device": name,
        "dtype": args.dtype,
        "layers": cfg["num_hidden_layers"],
        "prompt": args.prompt,
        "decode_steps": args.decode,
        "mixed_decode_steps": args.mixed_decode,
        "rank": args.rank,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "decode": rows,
        "skipped": skipped,
        "seconds": time.perf_counter() - started,
    }
    print("HF_BENCH " + json.dumps(record))
    if args.compare:
        report_compare(args.compare, record)
    return 0


def report_compare(path, record):
    batos = find_batos(path)
    if batos is None:
        print("hf_peft_bench: --compare: no BATOS_BENCH line of the synthetic f16 model in " + path)
        return
    rows = compare(batos, record)
    print("\n| batch | adapters | batos tok/s | HF+PEFT tok/s | batos / HF |\n|---|---|---|---|---|")
    for b, n, ours, theirs, ratio in rows:
        print(f"| {b} | {n} | {ours:.0f} | {theirs:.1f} | {ratio:.1f}x |")
    print("BATOS_VS_HF " + json.dumps([
        {"batch": b, "adapters": n, "batos": ours, "hf": theirs, "ratio": ratio}
        for b, n, ours, theirs, ratio in rows
    ]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
