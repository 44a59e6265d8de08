#!/usr/bin/env python3
"""Static SASS of one kernel: NVRTC (sm_90 CUBIN) + nvdisasm, no GPU needed.

    NVRTC_LIB=.../libnvrtc.so.12 NVDISASM=.../nvdisasm \\
        python3 scripts/sass-report.py awq awq_gemv_h2v4_f16 [out.sass]

Prints the instruction mix of the kernel and of its innermost hot loop (the
backward branch with the most global loads in its body), which is what the
"instructions per 16-byte load" figures in docs/perf/gpu-kernels.md come from.
"""
import collections, ctypes, os, re, subprocess, sys, tempfile

mod, kernel = sys.argv[1], sys.argv[2]
out = sys.argv[3] if len(sys.argv) > 3 else None
lib = ctypes.CDLL(os.environ["NVRTC_LIB"])
src = (open("kernels/prelude.cuh").read() + "\n" + open(f"kernels/{mod}.cu").read()).encode()
prog = ctypes.c_void_p()
lib.nvrtcCreateProgram(ctypes.byref(prog), src, f"{mod}.cu".encode(), 0, None, None)
opts = [b"--gpu-architecture=sm_90", b"--std=c++17"]
rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
if rc:
    n = ctypes.c_size_t(); lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value); lib.nvrtcGetProgramLog(prog, log)
    sys.exit(log.value.decode())
n = ctypes.c_size_t(); lib.nvrtcGetCUBINSize(prog, ctypes.byref(n))
cub = ctypes.create_string_buffer(n.value); lib.nvrtcGetCUBIN(prog, cub)
with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
    f.write(cub.raw); path = f.name
full = subprocess.run([os.environ["NVDISASM"], "-c", path], capture_output=True, text=True, check=True).stdout
# Keep the kernel's own code section.
parts = re.split(r"(?m)^\s*\.section\s+", full)
sass = next((p for p in parts if p.startswith(f".text.{kernel}\t") or p.startswith(f".text.{kernel},") or p.startswith(f".text.{kernel} ")), "")
if not sass:
    sys.exit(f"no code section for {kernel}")
if out: open(out, "w").write(sass)
ins = []  # (address, opcode, full text)
labels, pending = {}, []
for line in sass.splitlines():
    lm = re.match(r"\s*(\.L_x_\d+):", line)
    if lm: pending.append(lm.group(1))
    m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*?);", line)
    if m:
        ins.append((int(m.group(1), 16), m.group(3), line.strip()))
        for l in pending: labels[l] = ins[-1][0]
        pending = []
def mix(body):
    c = collections.Counter(op.split(".")[0] for _, op, _ in body)
    return ", ".join(f"{k} {v}" for k, v in c.most_common())
print(f"{kernel}: {len(ins)} instructions")
# Loops: backward branches. Hot loop = the one with the most wide global loads.
best = None
for i, (addr, op, text) in enumerate(ins):
    if op.startswith("BRA"):
        m = re.search(r"\((\.L_x_\d+)\)", text)
        if m and m.group(1) in labels and labels[m.group(1)] <= addr:
            tgt = labels[m.group(1)]
            body = [x for x in ins if tgt <= x[0] <= addr]
            loads = sum(1 for _, o, _ in body if o.startswith("LDG"))
            if best is None or loads > best[0] or (loads == best[0] and len(body) < len(best[1])):
                best = (loads, body, tgt, addr)
if best:
    loads, body, tgt, addr = best
    print(f"hot loop {tgt:#x}..{addr:#x}: {len(body)} instructions, {loads} global loads")
    print("  mix:", mix(body))
    wide = [o for _, o, _ in body if o.startswith("LDG")]
    print("  loads:", collections.Counter(wide))
