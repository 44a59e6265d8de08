# Parity check of the emulated kernels (see emu.h) against float64 numpy references.
# Launch geometry mirrors the Rust launchers in crates/batos-kernels/src/cuda/ops.
import ctypes as C, numpy as np, sys, math
import os
D = os.environ.get("EMU_DIR", "/tmp/batos-cuda-emu")
libs = {m: C.CDLL(f"{D}/lib{m}_emu.so") for m in ["elementwise", "sampling", "awq", "lora", "attention", "dense"]}
def P(a): return a.ctypes.data_as(C.c_void_p)
def launch(mod, name, grid, block, smem, *args):
    f = getattr(libs[mod], "L_" + name)
    cargs = [C.c_uint(grid[0]), C.c_uint(grid[1]), C.c_uint(grid[2]), C.c_uint(block), C.c_uint(smem)]
    for a in args:
        if isinstance(a, np.ndarray): cargs.append(P(a))
        elif isinstance(a, float): cargs.append(C.c_float(a))
        elif isinstance(a, tuple) and a[0] == "ll": cargs.append(C.c_longlong(a[1]))
        elif isinstance(a, tuple) and a[0] == "u": cargs.append(C.c_uint(a[1]))
        else: cargs.append(C.c_int(a))
    f(*cargs)
rng = np.random.default_rng(0)
DT = {"f32": np.float32, "f16": np.float16}
def close(what, got, want, scale, rtol, atol=1e-6):
    err = np.abs(got.astype(np.float64) - want)
    lim = rtol * scale + atol
    bad = np.argwhere(~(err <= lim))
    if len(bad):
        i = tuple(bad[0])
        print(f"FAIL {what}: {len(bad)} bad, first {i}: got {got[i]} want {want[i]} err {err[i]:.3e} lim {lim[i]:.3e}")
        return False
    print(f"ok {what}: max err {err.max():.3e}")
    return True
OK = True
# EMU_ONLY=awq,lora runs only those sections (elementwise, sampling, awq, awq_h2, lora, lora_grouped, decode, prefill, dense).
ONLY = [w for w in os.environ.get("EMU_ONLY", "").split(",") if w]
def section_on(name): return not ONLY or name in ONLY

# ---- rms_norm / silu / rope / embedding
for s in (["f32", "f16"] if section_on("elementwise") else []):
    dt = DT[s]; rows, d = 3, 577
    x = rng.uniform(-1, 1, (rows, d)).astype(dt); w = rng.uniform(-1, 1, d).astype(dt); out = np.zeros_like(x)
    launch("elementwise", f"rms_norm_{s}", (rows, 1, 1), 256, 0, x, w, out, d, 1e-5)
    xd = x.astype(np.float64); want = xd / np.sqrt((xd**2).mean(1, keepdims=True) + 1e-5) * w.astype(np.float64)
    OK &= close(f"rms_norm {s}", out, want, np.abs(want) + 1e-3, 1e-5 if s == "f32" else 4e-3)
    n = 1001; g = (rng.uniform(-6, 6, n)).astype(dt); u = rng.uniform(-1, 1, n).astype(dt); o = np.zeros_like(g)
    launch("elementwise", f"silu_mul_{s}", (4, 1, 1), 256, 0, g, u, o, ("ll", n))
    gd = g.astype(np.float64); want = gd / (1 + np.exp(-gd)) * u
    OK &= close(f"silu {s}", o, want, np.abs(want) + 1e-3, 1e-5 if s == "f32" else 4e-3)
    T, nh, nkv, hd = 5, 9, 3, 64
    q = rng.uniform(-1, 1, (T, nh, hd)).astype(dt); k = rng.uniform(-1, 1, (T, nkv, hd)).astype(dt)
    pos = np.array([0, 1, 17, 513, 4095], dtype=np.int32)
    inv = (1.0 / 10000 ** (np.arange(0, hd, 2, dtype=np.float32) / hd)).astype(np.float32)
    q0, k0 = q.astype(np.float64), k.astype(np.float64)
    launch("elementwise", f"rope_{s}", (T, 1, 1), 128, 0, q, k, pos, inv, nh, nkv, hd)
    ang = (pos[:, None].astype(np.float32) * inv[None, :]).astype(np.float64)
    c, sn = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    def rot(x): 
        x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
        return np.concatenate([x1 * c - x2 * sn, x2 * c + x1 * sn], -1)
    OK &= close(f"rope q {s}", q, rot(q0), np.ones_like(q0), 2e-6 if s == "f32" else 4e-3, 1e-5)
    OK &= close(f"rope k {s}", k, rot(k0), np.ones_like(k0), 2e-6 if s == "f32" else 4e-3, 1e-5)
if section_on("elementwise"):
    tab = rng.uniform(-1, 1, (50, 37)).astype(np.float32); ids = np.array([0, 49, 7, 7, 23, 60], dtype=np.uint32); o = np.zeros((6, 37), np.float32)
    launch("elementwise", "embedding_f32", (6, 1, 1), 128, 0, tab, ids, o, ("u", 50), 37)
    OK &= bool(np.array_equal(o[:5], tab[ids[:5]]) and np.all(o[5] == 0)); print("embedding", OK)

# ---- argmax / top_p
if section_on("sampling"):
  rows, V = 3, 4999
  lg = rng.uniform(-1, 1, (rows, V)).astype(np.float32); lg[1, 400] = 5; lg[1, 3000] = 5; lg[2, V - 1] = 7
  o = np.zeros(rows, np.uint32)
  launch("sampling", "argmax_f32", (rows, 1, 1), 256, 0, lg, o, V)
  print("argmax", o, np.argmax(lg, 1)); OK &= bool(np.array_equal(o, np.argmax(lg, 1)))
  # The greedy step of the device runtime (forward_greedy): SmolLM2's vocab, a NaN that
  # must not win, a tie (lowest index wins) and a constant row.
  rows, V = 3, 49152
  lg = rng.uniform(-1, 1, (rows, V)).astype(np.float32)
  lg[0, 5] = np.nan; lg[0, 100] = 9; lg[0, 40000] = 9; lg[1, V - 2] = 3; lg[2] = 0.5
  o = np.zeros(rows, np.uint32)
  launch("sampling", "argmax_f32", (rows, 1, 1), 256, 0, lg, o, V)
  want = np.nanargmax(lg, 1)
  print("argmax (vocab 49152, NaN, ties)", o, want); OK &= bool(np.array_equal(o, want))
  rows, V = 6, 1000
  lg = (rng.uniform(-1, 1, (rows, V)) * 4).astype(np.float32); us = np.array([0, 0.1, 0.35, 0.5, 0.77, 0.999], np.float32)
  o = np.zeros(rows, np.uint32); temp, top_p = 0.7, 0.9
  launch("sampling", "top_p_f32", (rows, 1, 1), 512, 0, lg, us, o, V, 1 / temp, top_p)
  for r in range(rows):
      z = lg[r].astype(np.float64) / temp; p = np.exp(z - z.max()); p /= p.sum()
      order = np.argsort(-p, kind="stable"); cs = np.cumsum(p[order]); n = int(np.searchsorted(cs, top_p) + 1)
      keep = np.zeros(V, bool); keep[order[:n]] = True
      g = int(o[r]); mass = p[keep].sum(); before = p[:g][keep[:g]].sum(); t = us[r] * mass
      good = keep[g] and before <= t + 1e-4 and t <= before + p[g] + 1e-4
      print(f"top_p row {r}: token {g} keep={keep[g]} before={before:.4f} t={t:.4f} p={p[g]:.4f} {'ok' if good else 'FAIL'}"); OK &= bool(good)

# ---- AWQ
ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
def pack(v):
    r, c = v.shape; out = np.zeros((r, c // 8), np.uint32)
    for i, o_ in enumerate(ORDER): out |= (v[:, o_::8].astype(np.uint32) & 0xF) << (4 * i)
    return out
def awq_case(K, N, G):
    q = rng.integers(0, 16, (K, N)); z = rng.integers(0, 16, (K // G, N)); sc = rng.uniform(0.002, 0.042, (K // G, N)).astype(np.float16)
    W = (q - np.repeat(z, G, 0)) * np.repeat(sc.astype(np.float64), G, 0)
    return pack(q), pack(z), sc, W
def gemv(qw, qz, sc, x, T, K, N, G, target=64):
    out8 = N // 8
    if T == 1 and out8 % 4 == 0: var, vec, tok = "awq_gemv_t1v4", 4, 1
    elif T == 1: var, vec, tok = "awq_gemv_t1v1", 1, 1
    else: var, vec, tok = "awq_gemv_t4v1", 1, 4
    bx = -(-out8 // (vec * 32)); bz = -(-T // tok)
    gc = next(c for c in [128, 64, 32, 16, 8, 4, 2, 1] if G % c == 0); unit = min(gc, 64)
    want = max(-(-target // (bx * bz)), 1)
    rps = max(-(-(-(-K // want)) // unit), 1) * unit
    chunk = next(c for c in [128, 64, 32, 16, 8, 4, 2, 1] if c <= gc and rps % c == 0)
    splits = -(-K // rps)
    part = np.full((splits, T, N), np.nan, np.float32)
    launch("awq", var + "_" + s, (bx, splits, bz), 256, 0, qw, qz, sc, x, part, T, K, N, G, rps, chunk)
    y = np.zeros((T, N), DT[s]); n = T * N
    launch("awq", "awq_reduce_" + s, (min(-(-n // 256), 4096), 1, 1), 256, 0, part, y, splits, ("ll", n))
    return y, splits, rps
for (K, N, G) in ([(384, 200, 128), (512, 512, 64), (256, 64, 32), (1024, 72, 128), (96, 48, 16)] if section_on("awq") else []):
    qw, qz, sc, W = awq_case(K, N, G)
    for s in ["f32", "f16"]:
        for T in [1, 3, 5]:
            x = rng.uniform(-1, 1, (T, K)).astype(DT[s])
            for target in [1, 64]:
                y, splits, rps = gemv(qw, qz, sc, x, T, K, N, G, target)
                xd = x.astype(np.float64)
                OK &= close(f"gemv {s} T={T} {K}x{N} g{G} splits={splits} rps={rps}", y, xd @ W, np.abs(xd) @ np.abs(W), 2e-5 if s == "f32" else 4e-3)
        for T in [1, 5, 64, 70]:
            for sms in [1, 132]:
                x = rng.uniform(-1, 1, (T, K)).astype(DT[s]); y = np.zeros((T, N), DT[s])
                nt, mt = -(-N // 64), -(-T // 64); kt = K // 32
                want = -(-(2 * sms) // (nt * mt)); splits = min(max(want, 1), max(kt // 8, 1))
                kps = -(-kt // splits) * 32; splits = -(-K // kps)
                part = np.full((splits, T, N), np.nan, np.float32) if splits > 1 else np.zeros(1, np.float32)
                launch("awq", "awq_gemm_" + s, (nt, mt, splits), 128, 0, qw, qz, sc, x, y, part, T, K, N, G, kps)
                if splits > 1:
                    n = T * N
                    launch("awq", "awq_reduce_" + s, (min(-(-n // 256), 4096), 1, 1), 256, 0, part, y, splits, ("ll", n))
                xd = x.astype(np.float64)
                OK &= close(f"gemm {s} T={T} {K}x{N} g{G} splits={splits}", y, xd @ W, np.abs(xd) @ np.abs(W), 4e-3 if s == "f32" else 6e-3)

# ---- AWQ f16 matvec, packed-half2 path with the fused split reduction (mirrors gemv_h2_plan in awq.rs)
def gemv_h2(qw, qz, sc, x, K, N, G, sms, counters=None):
    T = x.shape[0]; out8 = N // 8; vec = 1 if T > 1 else (4 if out8 % 4 == 0 else 1)
    bx = -(-out8 // (32 * vec))
    seg = next(c for c in [32, 16, 8] if G % c == 0)
    want_ = min(max((2 * sms) // bx, 1), 32)
    rps = max(64, -(-(-(-K // want_)) // 64) * 64)
    splits = -(-K // rps)
    part = np.full((splits, T, N), np.nan, np.float32)
    cnt = np.zeros(bx, np.uint32) if counters is None else counters
    y = np.full((T, N), np.nan, np.float16)
    if T > 1: launch("awq", "awq_gemv_h2t4_f16", (bx, splits, 1), 256, 0, qw, qz, sc, x, part, cnt, y, T, K, N, G, rps, seg)
    else: launch("awq", f"awq_gemv_h2v{vec}_f16", (bx, splits, 1), 256, 0, qw, qz, sc, x, part, cnt, y, K, N, G, rps, seg)
    return y, splits, rps, vec, cnt
if section_on("awq_h2"):
    for (K, N, G) in [(384, 200, 128), (512, 512, 64), (256, 64, 32), (1024, 72, 128), (96, 48, 16), (576, 960, 32), (1536, 1024, 128), (160, 256, 32), (192, 128, 64), (64, 64, 32), (128, 256, 8)]:
        qw, qz, sc, W = awq_case(K, N, G)
        multi = [(132, 2), (4, 3), (132, 4)] if (K, N) in [(384, 200), (512, 512), (96, 48), (576, 960), (128, 256)] else []
        for sms, T in [(1, 1), (4, 1), (132, 1)] + multi:
            for mag in ([1.0, 40.0] if T == 1 else [1.0]):
                x = (rng.uniform(-1, 1, (T, K)) * mag).astype(np.float16)
                y, splits, rps, vec, cnt = gemv_h2(qw, qz, sc, x, K, N, G, sms)
                xd = x.astype(np.float64)
                rel = (np.abs(y.astype(np.float64) - xd @ W) / (np.abs(xd) @ np.abs(W) + 1e-9)).max()
                print(f"   worst error relative to sum|x||W|: {rel:.2e}")
                OK &= close(f"gemv_h2 T={T} v{vec} {K}x{N} g{G} |x|<{mag} splits={splits} rps={rps}", y, xd @ W, np.abs(xd) @ np.abs(W), 4e-3)
                if cnt.any(): print("FAIL counters not reset", cnt); OK = False
        # A second launch with the same (reset) tickets gives the same bits.
        y2, *_ = gemv_h2(qw, qz, sc, x, K, N, G, 132, cnt)
        if not np.array_equal(y2, gemv_h2(qw, qz, sc, x, K, N, G, 132)[0]): print("FAIL h2 not deterministic"); OK = False

# ---- LoRA
ranks = np.array([8, 16, 0, 4, 16, 1], np.int32); S, R, K, N = 6, 16, 600, 136
A = rng.uniform(-1, 1, (S, R, K)).astype(np.float32); Bt = rng.uniform(-1, 1, (S, R, N)).astype(np.float32)
for si in range(S): A[si, ranks[si]:] = 1e6; Bt[si, ranks[si]:] = -1e6
scales = (2.0 / np.maximum(ranks, 1)).astype(np.float32)
def lora_ref(x, y0, slots):
    y = y0.astype(np.float64).copy(); sc = np.abs(y0.astype(np.float64)) + 1e-3
    for t, si in enumerate(slots):
        if si is None: continue
        r = ranks[si]; a = A[si, :r].astype(np.float64); b = Bt[si, :r].astype(np.float64) * scales[si]
        h = a @ x[t]; y[t] += h @ b; sc[t] += (np.abs(a) @ np.abs(x[t])) @ np.abs(b)
    return y, sc
dec = [1, None, 0, 0, 4, None, 3, 1, 2, 5, None, 4, 1]
pre = sum([[s_] * n for s_, n in [(1, 37), (None, 3), (0, 16), (4, 17), (2, 1), (None, 5), (3, 40)]], [])
for s in (["f32", "f16"] if section_on("lora") else []):
    dt = DT[s]; As, Bs = A.astype(dt), Bt.astype(dt)
    for mode, slots in [("bgmv", dec), ("sgmv", pre), ("bgmv", pre), ("sgmv", dec)]:
        T = len(slots); x = rng.uniform(-1, 1, (T, K)).astype(dt); y0 = rng.uniform(-1, 1, (T, N)).astype(dt); y = y0.copy()
        act = [(t, si) for t, si in enumerate(slots) if si is not None]; rows = len(act)
        ks = -(-K // 256); h = np.full((ks, rows, R), np.nan, np.float32)
        if mode == "bgmv":
            tok = np.array([a for a, _ in act], np.int32); sl = np.array([b for _, b in act], np.int32)
            launch("lora", "bgmv_shrink_" + s, (rows, -(-R // 4), ks), 128, 0, x, As, tok, sl, ranks, h, K, R)
            launch("lora", "bgmv_expand_" + s, (rows, -(-N // 256), 1), 256, R * 4, h, Bs, tok, sl, ranks, scales, y, N, R, ks)
        else:
            st, ln, tsl, hr = [], [], [], []; t = 0; row = 0
            while t < T:
                if slots[t] is None: t += 1; continue
                e = t + 1
                while e < T and slots[e] == slots[t] and e - t < 16: e += 1
                st.append(t); ln.append(e - t); tsl.append(slots[t]); hr.append(row); row += e - t; t = e
            st, ln, tsl, hr = [np.array(v, np.int32) for v in (st, ln, tsl, hr)]
            launch("lora", "sgmv_shrink_" + s, (len(st), ks, 1), 128, 0, x, As, st, ln, tsl, hr, ranks, h, K, R, rows)
            launch("lora", "sgmv_expand_" + s, (len(st), -(-N // 256), 1), 256, 16 * R * 4, h, Bs, st, ln, tsl, hr, ranks, scales, y, N, R, ks, rows)
        Ar, Br = As.astype(np.float32), Bs.astype(np.float32)
        A_, B_ = A, Bt
        A, Bt = Ar, Br
        want, sc = lora_ref(x.astype(np.float64), y0, slots)
        A, Bt = A_, B_
        untouched = all(np.array_equal(y[t], y0[t]) for t, si in enumerate(slots) if si is None)
        OK &= untouched and close(f"lora {mode} {s} T={T}", y, want, sc, 1e-5 if s == "f32" else 4e-3)

# ---- LoRA grouped (mirrors LoraMode::Grouped in lora.rs)
def grouped_lists(slots):
    act = sorted([(si, t) for t, si in enumerate(slots) if si is not None], key=lambda v: v[0])
    perm = [t for _, t in act]; st, ln, sl = [], [], []; p = 0
    while p < len(act):
        e = p + 1
        while e < len(act) and act[e][0] == act[p][0] and e - p < 16: e += 1
        st.append(p); ln.append(e - p); sl.append(act[p][0]); p = e
    return [np.array(v, np.int32) for v in (perm, st, ln, sl)]
if section_on("lora_grouped"):
    cases = [(ranks, 16, 600, 136, dec), (ranks, 16, 600, 136, pre),
             (np.array([40, 3, 17, 0, 33], np.int32), 40, 776, 1288, [t % 5 for t in range(13)] + [0] * 20 + [None])]
    for s in ["f32", "f16"]:
        dt = DT[s]
        for rk, R_, K_, N_, slots in cases:
            S_ = len(rk)
            A_ = rng.uniform(-1, 1, (S_, R_, K_)).astype(dt); B_ = rng.uniform(-1, 1, (S_, R_, N_)).astype(dt)
            for si in range(S_): A_[si, rk[si]:] = 1e4; B_[si, rk[si]:] = -1e4
            sc_ = (2.0 / np.maximum(rk, 1)).astype(np.float32)
            T = len(slots); x = rng.uniform(-1, 1, (T, K_)).astype(dt); y0 = rng.uniform(-1, 1, (T, N_)).astype(dt); y = y0.copy()
            perm, st, ln, sl = grouped_lists(slots); rows = len(perm); ks = -(-K_ // 256)
            h = np.full((ks, rows, R_), np.nan, np.float32)
            launch("lora", "grouped_shrink_" + s, (len(st), ks, 1), 256, 0, x, A_, perm, st, ln, sl, rk, h, K_, R_, rows)
            launch("lora", "grouped_expand_" + s, (len(st), -(-N_ // 1024), 1), 128, 16 * R_ * 4, h, B_, perm, st, ln, sl, rk, sc_, y, N_, R_, ks, rows)
            want_ = y0.astype(np.float64).copy(); scl = np.abs(want_) + 1e-3
            for t, si in enumerate(slots):
                if si is None: continue
                r = rk[si]; a = A_[si, :r].astype(np.float64); b = B_[si, :r].astype(np.float64) * sc_[si]
                hh = a @ x[t].astype(np.float64); want_[t] += hh @ b; scl[t] += (np.abs(a) @ np.abs(x[t].astype(np.float64))) @ np.abs(b)
            untouched = all(np.array_equal(y[t], y0[t]) for t, si in enumerate(slots) if si is None)
            OK &= untouched and close(f"lora grouped {s} T={T} R={R_} {K_}x{N_}", y, want_, scl, 1e-5 if s == "f32" else 4e-3)

# ---- attention
def attn(s, nh, nkv, hd, seqs, kernel, bs=16, dec_part=256):
    dt = DT[s]; row = nkv * hd
    need = sum(-(-(p + t) // bs) for p, t in seqs); NB = need + 7
    perm = rng.permutation(NB); tables = []; i = 0
    for p, t in seqs:
        nb = -(-(p + t) // bs); tables.append(perm[i:i + nb]); i += nb
    kc = np.zeros((NB, bs, nkv, hd), dt); vc = np.zeros_like(kc)
    Ks, Vs, slots = [], [], []
    for (p, t), tb in zip(seqs, tables):
        ctx = p + t; Ks.append(rng.uniform(-1, 1, (ctx, nkv, hd)).astype(dt)); Vs.append(rng.uniform(-1, 1, (ctx, nkv, hd)).astype(dt))
        slots += [tb[q // bs] * bs + q % bs for q in range(ctx)]
    kn = np.concatenate(Ks); vn = np.concatenate(Vs); sl = np.array(slots, np.int64)
    launch("attention", "write_kv_" + s, (len(sl), 1, 1), 128, 0, kn, vn, sl, kc, vc, row)
    T = sum(t for _, t in seqs); q = (rng.uniform(-3, 3, (T, nh, hd))).astype(dt)
    mb = max(len(tb) for tb in tables); bt = np.zeros((len(seqs), mb), np.int32)
    for i_, tb in enumerate(tables): bt[i_, :len(tb)] = tb
    ts, tp, tst, tln = [], [], [], []
    for i_, (p, t) in enumerate(seqs):
        first = len(ts); ts += [i_] * t; tp += list(range(p, p + t))
        for a in range(0, t, 16): tst.append(first + a); tln.append(min(16, t - a))
    ts, tp, tst, tln = [np.array(v, np.int32) for v in (ts, tp, tst, tln)]
    out = np.full((T, nh, hd), np.nan, dt); scale = 1 / math.sqrt(hd); G = nh // nkv
    if kernel == "decode":
        maxctx = max(p + t for p, t in seqs); part = dec_part; splits = -(-maxctx // part)
        po = np.full((T, nh, splits, hd), np.nan, np.float32); pm = np.full((T, nh, splits), np.nan, np.float32); pl = pm.copy()
        vw = 4 if s == "f32" else 8; kg = max(1, 128 // (hd // vw)); smem = (G * hd + G * 256 + G * hd * kg) * 4
        launch("attention", "paged_decode_" + s, (T, nkv, splits), 128, smem, q, kc, vc, ts, tp, bt, po, pm, pl, nh, nkv, hd, bs, mb, scale, part)
        launch("attention", "paged_decode_reduce_" + s, (T, nh, 1), 128, 0, po, pm, pl, out, nh, hd, splits)
    else:
        smem = (16 * hd + 32 * (hd + 1) + 32 * hd + 16 * 32 + 48) * 4
        launch("attention", "paged_prefill_" + s, (len(tst), nh, 1), 128, smem, q, kc, vc, ts, tp, bt, tst, tln, out, nh, nkv, hd, bs, mb, scale)
    want = np.zeros((T, nh, hd)); sc = np.zeros((T, nh, hd)); r = 0
    for si, (p, t) in enumerate(seqs):
        Kd = Ks[si].astype(np.float64); Vd = Vs[si].astype(np.float64)
        for i_ in range(t):
            pos = p + i_
            for h in range(nh):
                kv = h // G; sco = Kd[:pos + 1, kv] @ q[r, h].astype(np.float64) * scale
                e = np.exp(sco - sco.max()); e /= e.sum()
                want[r, h] = e @ Vd[:pos + 1, kv]; sc[r, h] = e @ np.abs(Vd[:pos + 1, kv]) + 1e-3
            r += 1
    return close(f"attention {kernel} {s} hd={hd} {nh}/{nkv} {seqs}", out, want, sc, 1e-4 if s == "f32" else 4e-3, 1e-5)
for s in ["f32", "f16"]:
    if section_on("decode"): OK &= attn(s, 9, 3, 64, [(0, 1), (16, 1), (299, 1), (700, 1), (255, 1), (256, 1)], "decode")
    if section_on("prefill"): OK &= attn(s, 9, 3, 64, [(0, 37), (40, 20), (5, 3), (0, 16), (300, 17)], "prefill")
if section_on("decode"):
    OK &= attn("f32", 8, 2, 128, [(600, 1), (3, 1)], "decode")
    OK &= attn("f32", 4, 4, 32, [(40, 1), (513, 1)], "decode")
    OK &= attn("f32", 9, 3, 64, [(5, 20), (0, 3)], "decode")
    # Smaller partitions (the host's choice for few sequences) and odd block sizes.
    OK &= attn("f16", 9, 3, 64, [(300, 1), (64, 1), (127, 1)], "decode", bs=7, dec_part=64)
    OK &= attn("f32", 8, 2, 128, [(200, 1)], "decode", bs=5, dec_part=128)
if section_on("prefill"):
    OK &= attn("f32", 8, 2, 128, [(0, 33), (70, 5)], "prefill")
    OK &= attn("f32", 4, 1, 32, [(17, 40)], "prefill")

# ---- dense f16-weight matmul and row kernels (kernels/dense.cu)
if section_on("dense"):
    def dense(s, T, K, N):
        dt = DT[s]
        x = rng.uniform(-1, 1, (T, K)).astype(dt); w = rng.uniform(-1, 1, (N, K)).astype(np.float16)
        y = np.full((T, N), np.nan, dt)
        launch("dense", "dense_matmul_" + s, (-(-N // 8), -(-T // 8), 1), 256, 0, x, w, y, T, K, N)
        xd, wd = x.astype(np.float64), w.astype(np.float64)
        return close(f"dense_matmul {s} T={T} K={K} N={N}", y, xd @ wd.T, np.abs(xd) @ np.abs(wd).T + 1e-3, 1e-5 if s == "f32" else 4e-3)
    for s in ["f32", "f16"]:
        OK &= dense(s, 1, 576, 40)
        OK &= dense(s, 13, 64, 17)
    OK &= dense("f32", 9, 30, 11)
    OK &= dense("f32", 3, 1536, 24)
    a = rng.uniform(-1, 1, (5, 7)).astype(np.float32); b = rng.uniform(-1, 1, (5, 7)).astype(np.float32); want = a.astype(np.float64) + b
    launch("dense", "add_rows_f32", (1, 1, 1), 256, 0, a, b, ("ll", 35))
    OK &= close("add_rows f32", a, want, np.ones_like(want), 1e-7)
    src = rng.uniform(-1, 1, (6, 9)).astype(np.float32); rows = np.array([5, 0, 5, 2], np.int32); o = np.zeros((4, 9), np.float32)
    launch("dense", "gather_rows_f32", (4, 1, 1), 128, 0, src, rows, o, 9)
    ok = bool(np.array_equal(o, src[rows])); print("gather_rows", ok); OK &= ok
    fused = rng.uniform(-1, 1, (3, 10)).astype(np.float32); o = np.zeros((3, 4), np.float32)
    launch("dense", "copy_cols_f32", (3, 1, 1), 128, 0, fused, o, 10, 5, 4)
    ok = bool(np.array_equal(o, fused[:, 5:9])); print("copy_cols", ok); OK &= ok
    tab = rng.uniform(-1, 1, (50, 37)).astype(np.float16); ids = np.array([0, 49, 7, 60], dtype=np.uint32); o = np.zeros((4, 37), np.float32)
    launch("dense", "embed_h_f32", (4, 1, 1), 128, 0, tab, ids, o, ("u", 50), 37)
    ok = bool(np.array_equal(o[:3], tab[ids[:3]].astype(np.float32)) and np.all(o[3] == 0)); print("embed_h", ok); OK &= ok
print("ALL OK" if OK else "SOME FAILED")
sys.exit(0 if OK else 1)
