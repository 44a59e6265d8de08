#!/usr/bin/env bash
# Registers, shared memory and spills of every kernel for sm_90, as ptxas reports
# them through NVRTC (no GPU needed; uses the venv of scripts/nvrtc-check.sh).
# A kernel with non-zero spill stores is printed with a "SPILLS" mark.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${BATOS_NVRTC_VENV:-$PWD/.cache/nvrtc-venv}
LIB=$(ls "$VENV"/lib/python3*/site-packages/nvidia/cuda_nvrtc/lib/libnvrtc.so.* 2>/dev/null | grep -v -e builtins -e alt | head -n1)
[ -n "$LIB" ] || { echo "ptxas-report: no libnvrtc in $VENV (run scripts/nvrtc-check.sh first)"; exit 2; }
NVRTC_LIB="$LIB" python3 - kernels/*.cu <<'PY'
import ctypes, os, re, sys
lib = ctypes.CDLL(os.environ["NVRTC_LIB"])
pre = open("kernels/prelude.cuh").read()
bad = 0
for f in sys.argv[1:]:
    src = (pre + "\n" + open(f).read()).encode()
    prog = ctypes.c_void_p()
    lib.nvrtcCreateProgram(ctypes.byref(prog), src, os.path.basename(f).encode(), 0, None, None)
    opts = [b"--gpu-architecture=sm_90", b"--std=c++17", b"--ptxas-options=-v"]
    rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    n = ctypes.c_size_t(); lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value); lib.nvrtcGetProgramLog(prog, log)
    cur, spill = None, ""
    for line in log.value.decode().splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m: cur = m.group(1)
        m = re.search(r"(\d+) bytes spill stores", line)
        if m: spill = "  SPILLS" if int(m.group(1)) else ""; bad += bool(int(m.group(1)))
        m = re.search(r"Used (\d+) registers.*?(\d+ bytes smem)?$", line)
        if m and cur: print(f"{cur:28} {m.group(1):>4} regs  {m.group(2) or '0 bytes smem':>16}{spill}")
    if rc: print(f, "FAILED", rc); bad += 1
sys.exit(1 if bad else 0)
PY
