#!/usr/bin/env python3
"""Makes a new PEFT LoRA adapter from an existing one: every lora_B matrix is scaled and
given seeded Gaussian noise (relative to its own RMS), lora_A is kept. The result has the
same shapes, rank and targets, so it costs the engine exactly what the original costs,
but it is a distinct adapter with a distinct content hash and different outputs.

Used by docs/perf/server.md to serve four r16 adapters from the one reference adapter:

    python3 scripts/perturb_adapter.py SRC_DIR DST_DIR --scale 0.5 --noise 0.3 --seed 1

Needs only numpy (the safetensors file is read and written by hand: an 8-byte
little-endian header length, a JSON header, then the raw tensors).
"""
import argparse
import json
import shutil
import struct
from pathlib import Path

import numpy as np

DTYPES = {"F32": np.float32, "F16": np.float16}


def read_safetensors(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    meta = header.pop("__metadata__", None)
    tensors = {}
    for name, info in header.items():
        if info["dtype"] not in DTYPES:
            raise SystemExit(f"{path}: tensor {name} has dtype {info['dtype']}; only F32/F16 handled")
        start, end = info["data_offsets"]
        arr = np.frombuffer(data[start:end], dtype=DTYPES[info["dtype"]]).reshape(info["shape"])
        tensors[name] = (info["dtype"], arr)
    return meta, tensors


def write_safetensors(path, meta, tensors):
    header = {}
    if meta is not None:
        header["__metadata__"] = meta
    blobs = []
    offset = 0
    for name in sorted(tensors):
        dtype, arr = tensors[name]
        b = np.ascontiguousarray(arr.astype(DTYPES[dtype])).tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path, help="a PEFT adapter directory")
    ap.add_argument("dst", type=Path, help="the new adapter directory (created)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies every lora_B")
    ap.add_argument("--noise", type=float, default=0.25, help="noise RMS, relative to each lora_B's RMS")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    meta, tensors = read_safetensors(args.src / "adapter_model.safetensors")
    rng = np.random.default_rng(args.seed)
    changed = 0
    for name in sorted(tensors):
        dtype, arr = tensors[name]
        if "lora_B" not in name:
            continue
        a = arr.astype(np.float32)
        rms = float(np.sqrt(np.mean(a * a))) or 1e-3
        a = a * args.scale + rng.standard_normal(a.shape).astype(np.float32) * (args.noise * rms)
        tensors[name] = (dtype, a)
        changed += 1
    if changed == 0:
        raise SystemExit(f"{args.src}: no lora_B tensors found")
    args.dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(args.src / "adapter_config.json", args.dst / "adapter_config.json")
    write_safetensors(args.dst / "adapter_model.safetensors", meta, tensors)
    print(f"{args.dst}: {changed} lora_B tensors scaled by {args.scale} with noise {args.noise} (seed {args.seed})")


if __name__ == "__main__":
    main()
