# Builds kernels/*.cu for the host emulator: prelude + module with BATOS_CUDA_EMU,
# plus an extern "C" L_<kernel>(grid, block, smem, args...) launcher per entry point.
import re, subprocess, sys, os
root = sys.argv[1]; out = sys.argv[2]
pre = open(f"{root}/kernels/prelude.cuh").read()
mods = ["elementwise", "sampling", "awq", "lora", "attention", "dense"]
for m in mods:
    body = open(f"{root}/kernels/{m}.cu").read()
    body = re.sub(r"extern __shared__ float (\w+)\[\];", r"float* \1 = emu_dyn_smem();", body)
    src = '#include "emu.h"\n#define BATOS_CUDA_EMU 1\n' + pre + "\n" + body
    open(f"{out}/{m}_emu.cpp", "w").write(src)
    pp = subprocess.run(["g++", "-std=c++20", "-E", "-P", f"-I{out}", f"{out}/{m}_emu.cpp"], capture_output=True, text=True, check=True).stdout
    wr = []
    for name, params in re.findall(r'extern "C"\s+void\s+(\w+)\s*\(([^)]*)\)\s*\{', pp):
        ps = [p.strip() for p in params.split(",") if p.strip()]
        names = [re.split(r"[\s\*]+", p)[-1] for p in ps]
        wr.append(f'extern "C" void L_{name}(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned smem{"".join(", " + p for p in ps)}) {{ emu_launch(gx, gy, gz, bx, smem, [=] {{ {name}({", ".join(names)}); }}); }}')
    open(f"{out}/{m}_emu.cpp", "a").write("\n" + "\n".join(wr) + "\n")
    r = subprocess.run(["g++", "-std=c++20", "-O1", "-g", "-fPIC", "-shared", "-Wno-unknown-pragmas", f"-I{out}", "-o", f"{out}/lib{m}_emu.so", f"{out}/{m}_emu.cpp", "-lpthread"], capture_output=True, text=True)
    if r.returncode: print(r.stderr[:4000]); sys.exit(1)
    print(m, len(wr), "entry points")
