"""``moeray bench kernels``: the grouped expert computation alone, moeray's kernels vs transformers' experts.

CPU (always): moeray's torch path (on experts packed as CPU workers hold them, and on the canonical layout) vs
transformers' eager loop and every other implementation registered in ``ALL_EXPERTS_FUNCTIONS`` that runs on CPU,
as ratios, and achieved GFLOP/s against the floor: one plain ``torch.mm`` of the same FLOPs ([T*k, H] x [H, 3I]).
Then the same layer with its experts in bf16, FP8 (128x128 blocks) and MXFP4: ms, tokens/s, ratio to float32.
CUDA (when a GPU is present): Triton (bf16 experts, FP8 with 128x128 blocks, MXFP4) vs the torch path vs
``torch._grouped_mm``, TFLOP/s and percent of the device's bf16 peak. All in one run, on the same inputs.
"""

from __future__ import annotations

import functools
import statistics
import time

import torch
import transformers
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from moeray.kernels import cpu_rows
from moeray.kernels.api import ExpertWeights, GatedActivation, PackedExpertWeights, grouped_experts_torch

SHAPES = [  # name, experts, top_k, hidden, intermediate
    ("mixtral-like", 16, 2, 1024, 2048),
    ("deepseek-like", 64, 6, 1024, 1408),
]
BATCHED_MM_MAX_GB = 4.0
# Dense peak TFLOP/s by device name fragment: (fp32 non-tensor, bf16 tensor core).
PEAK_TFLOPS = {"H100": (67.0, 989.0), "H200": (67.0, 989.0), "A100": (19.5, 312.0), "L4": (30.3, 121.0)}


def _timed(fn, repeats: int, sync=lambda: None) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _inputs(tokens, experts, top_k, hidden, inter, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    config = transformers.MixtralConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=experts,
                                        num_experts_per_tok=top_k)
    config._experts_implementation = "eager"
    module = transformers.models.mixtral.modeling_mixtral.MixtralExperts(config)
    with torch.no_grad():
        module.gate_up_proj.copy_(torch.randn(module.gate_up_proj.shape, generator=g) / hidden**0.5)
        module.down_proj.copy_(torch.randn(module.down_proj.shape, generator=g) / inter**0.5)
    module = module.to(device, dtype).requires_grad_(False)
    x_TH = torch.randn(tokens, hidden, generator=g).to(device, dtype)
    probs = torch.softmax(torch.randn(tokens, experts, generator=g), dim=-1)
    top_w, top_i = torch.topk(probs, top_k, dim=-1)
    return module, x_TH, top_i.to(device), (top_w / top_w.sum(-1, keepdim=True)).to(device, dtype)


def run_kernels_bench(tokens: list[int], repeats: int = 10) -> list[dict]:
    rows = []
    print(f"CPU, float32, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    for name, experts, top_k, hidden, inter in SHAPES:
        for t in tokens:
            rows.append(_cpu_row(name, experts, top_k, hidden, inter, t, max(2, repeats if t <= 256 else 3)))
    if not torch.cuda.is_available():
        print("CUDA: no GPU on this machine; the Triton comparison is skipped.")
        return rows
    for name, experts, top_k, hidden, inter in SHAPES:
        for t in tokens:
            rows.append(_cuda_row(name, experts, top_k, hidden, inter, t, repeats))
    return rows


def _cpu_row(name, experts, top_k, hidden, inter, t, reps) -> dict:
    module, x_TH, top_i, top_w = _inputs(t, experts, top_k, hidden, inter, "cpu", torch.float32)
    weights = ExpertWeights(w_gate_up_S2IH=module.gate_up_proj.data, w_down_SHI=module.down_proj.data)
    pair_token = torch.arange(t).repeat_interleave(top_k)
    flops = 2 * t * top_k * hidden * 3 * inter
    run = lambda w: _timed(lambda: grouped_experts_torch(x_TH, pair_token, top_i.reshape(-1), top_w.reshape(-1), w,
                                                         GatedActivation()), reps)
    # CPU workers hold their experts packed when the CPU kernels run here: packed once, outside the timing.
    canonical = run(weights)
    ours = run(PackedExpertWeights.pack(weights)) if cpu_rows.available() else canonical
    theirs = {}
    for impl in ["eager"] + [n for n in ALL_EXPERTS_FUNCTIONS if n != "moeray"]:
        # batched_mm gathers a copy of its expert's weights for every (token, expert) pair
        gathered_gb = t * top_k * 3 * hidden * inter * 4 / 1e9
        if impl == "batched_mm" and gathered_gb > BATCHED_MM_MAX_GB:
            print(f"  {name} T={t}: transformers 'batched_mm' skipped: it would gather {gathered_gb:.0f} GB of weights")
            continue
        module.config._experts_implementation = impl
        try:
            theirs[impl] = _timed(lambda: module(x_TH, top_i, top_w), reps)
        except Exception as e:  # noqa: BLE001 - GPU-only implementations, or out of memory
            theirs[impl] = None
            print(f"  {name} T={t}: transformers '{impl}' does not run on CPU here ({type(e).__name__})")
    a, b = torch.randn(t * top_k, hidden), torch.randn(hidden, 3 * inter)
    floor = _timed(lambda: torch.mm(a, b), reps)
    ran = {k: v for k, v in theirs.items() if v is not None}
    best = min(ran, key=ran.get)
    row = {"device": "cpu", "shape": name, "tokens": t, "moeray_gflops": flops / ours / 1e9,
           "moeray_canonical_layout_gflops": flops / canonical / 1e9,
           "floor_gflops": flops / floor / 1e9, "best_hf": best, "speedup_vs_best_hf": ran[best] / ours,
           **{f"hf_{k}_gflops": flops / v / 1e9 for k, v in ran.items()}}
    row["pct_of_floor"] = 100 * row["moeray_gflops"] / row["floor_gflops"]
    hf = "  ".join(f"hf[{k}] {flops / v / 1e9:6.1f}" for k, v in ran.items())
    print(f"{name:14s} T={t:5d}  moeray {row['moeray_gflops']:6.1f} GFLOP/s (canonical layout "
          f"{row['moeray_canonical_layout_gflops']:.1f})  {hf}  "
          f"moeray/hf[{best}] {row['speedup_vs_best_hf']:.2f}x  floor {row['floor_gflops']:6.1f} "
          f"({row['pct_of_floor']:.0f}% of it)")
    row.update(_cpu_formats(name, t, x_TH, pair_token, top_i.reshape(-1), top_w.reshape(-1), weights, reps))
    return row


CPU_FORMATS = ("fp32", "bf16", "fp8", "mxfp4")  # expert formats compared on the CPU, float32 (packed) first
_CPU_QUANTIZED: dict[tuple, object] = {}  # (experts, hidden, inter, format) -> QuantizedExpertWeights


def _cpu_formats(name, t, x_TH, pair_token, pair_slot, pair_weight, weights: ExpertWeights, reps) -> dict:
    """The same layer and routing with the experts in float32 (packed), bf16, FP8 (128x128 blocks) and MXFP4
    (float32 activations but for bf16): ms, tokens/s and the ratio to float32. The formats take turns within each
    repetition, so that load from other processes falls on all of them alike; medians. The quantized weights are
    random bytes (bench_quantized_experts: the kernels' speed does not depend on the values), made once a shape."""
    experts, two_i, hidden = weights.w_gate_up_S2IH.shape
    calls = {}
    for fmt in CPU_FORMATS:
        x, pw = x_TH, pair_weight
        if fmt == "fp32":
            w = PackedExpertWeights.pack(weights) if cpu_rows.available() else weights
        elif fmt == "bf16":
            w = ExpertWeights(w_gate_up_S2IH=weights.w_gate_up_S2IH.bfloat16(),
                              w_down_SHI=weights.w_down_SHI.bfloat16())
            x, pw = x_TH.bfloat16(), pair_weight.bfloat16()
        else:
            key = (experts, hidden, two_i // 2, fmt)
            if key not in _CPU_QUANTIZED:
                _CPU_QUANTIZED[key] = bench_quantized_experts(*key, "cpu", dtype=torch.float32)
            w = _CPU_QUANTIZED[key]
        calls[fmt] = functools.partial(grouped_experts_torch, x, pair_token, pair_slot, pw, w, GatedActivation())
    samples = {fmt: [] for fmt in calls}
    for fn in calls.values():
        fn()  # warm-up
    for _ in range(reps):
        for fmt, fn in calls.items():
            start = time.perf_counter()
            fn()
            samples[fmt].append(time.perf_counter() - start)
    times = {fmt: statistics.median(v) for fmt, v in samples.items()}
    fp32 = times["fp32"]
    cols = "  ".join(f"{k} {v * 1e3:7.1f} ms {t / v:7.0f} tok/s" + ("" if k == "fp32" else f" ({fp32 / v:.2f}x)")
                     for k, v in times.items())
    print(f"{name:14s} T={t:5d}  experts as {cols}")
    return {**{f"{k}_ms": v * 1e3 for k, v in times.items()}, **{f"{k}_tokens_per_s": t / v for k, v in times.items()},
            **{f"{k}_vs_fp32": fp32 / v for k, v in times.items() if k != "fp32"}}


# The CUDA part. NOTE: scripts/gpu_check.py (``make gpu-check``) times through cuda_times too.
CUDA_IMPLS = ("triton", "triton fp8 128x128", "triton mxfp4", "torch path", "hf grouped_mm (torch._grouped_mm)")


def peak_tflops(device_name: str) -> tuple[float, float] | None:
    """(fp32, bf16) dense peak TFLOP/s of a device, by name fragment; None when unknown."""
    return next((p for k, p in PEAK_TFLOPS.items() if k in device_name), None)


def bench_quantized_experts(experts, hidden, inter, fmt, device, dtype=torch.bfloat16, seed=0):
    """Random ``QuantizedExpertWeights`` made on the device, fp8 with 128x128 blocks or mxfp4, with weights of
    about the bench's 1/sqrt(K) magnitude. Timings do not depend on the values, and quantizing model-sized layers
    with the CPU quantizers would take longer than the bench."""
    from moeray.kernels.api import ExpertQuant, QuantizedExpertWeights

    quant = ExpertQuant(format=fmt, block=(128, 128) if fmt == "fp8" else (1, 32))
    g = torch.Generator(device=device).manual_seed(seed)

    def projection(m, k):
        scale_shape = (experts, *quant.scale_shape(m, k))
        if fmt == "fp8":
            q = torch.randn(experts, m, k, generator=g, device=device).to(torch.float8_e4m3fn)
            return q, torch.full(scale_shape, k**-0.5, device=device)
        # e2m1 codes average |2|: a scale of 2 ** -(log2(k) / 2 + 1) brings them to ~1/sqrt(k)
        q = torch.randint(0, 256, (experts, m, k // 2), generator=g, device=device, dtype=torch.uint8)
        return q, torch.full(scale_shape, 126 - (k.bit_length() - 1) // 2, dtype=torch.uint8, device=device)

    (q_gu, s_gu), (q_down, s_down) = projection(2 * inter, hidden), projection(hidden, inter)
    return QuantizedExpertWeights(quant=quant, q_gate_up=q_gu, s_gate_up=s_gu, q_down=q_down, s_down=s_down,
                                  hidden=hidden, intermediate=inter, compute_dtype=dtype)


def cuda_times(experts, top_k, hidden, inter, t, reps, impls=CUDA_IMPLS, device="cuda",
               deadline: float | None = None) -> dict[str, float | str]:
    """Median seconds of each implementation in ``impls`` on the same bf16 inputs, or why it has none: "skipped:
    ..." once ``time.monotonic()`` passes ``deadline``, "error: ..." when it raised (GPU-only implementations,
    versions without ``torch._grouped_mm``). ``device="cpu"`` is for smoke runs under TRITON_INTERPRET=1."""
    from moeray.kernels.triton_grouped import grouped_experts_triton

    module, x_TH, top_i, top_w = _inputs(t, experts, top_k, hidden, inter, device, torch.bfloat16)
    plain = ExpertWeights(w_gate_up_S2IH=module.gate_up_proj.data, w_down_SHI=module.down_proj.data)
    routing = (x_TH, torch.arange(t, device=device).repeat_interleave(top_k), top_i.reshape(-1), top_w.reshape(-1))
    act = GatedActivation()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def runner(impl):
        if impl == "triton":
            return lambda: grouped_experts_triton(*routing, plain, act)
        if impl.startswith("triton "):  # "triton fp8 ...", "triton mxfp4"
            quantized = bench_quantized_experts(experts, hidden, inter, impl.split()[1], device)
            return lambda: grouped_experts_triton(*routing, quantized, act)
        if impl == "torch path":
            return lambda: grouped_experts_torch(*routing, plain, act)
        if impl.startswith("hf grouped_mm"):
            module.config._experts_implementation = "grouped_mm"
            return lambda: module(x_TH, top_i, top_w)
        raise ValueError(f"unknown implementation {impl!r}; known: {CUDA_IMPLS}")

    times: dict[str, float | str] = {}
    for impl in impls:
        if deadline is not None and time.monotonic() > deadline:
            times[impl] = "skipped: past the time budget"
            continue
        try:
            times[impl] = _timed(runner(impl), reps, sync)
        except Exception as e:  # noqa: BLE001 - reported per implementation; the others still run
            times[impl] = f"error: {type(e).__name__}: {e}"
    return times


def _cuda_row(name, experts, top_k, hidden, inter, t, reps) -> dict:
    times = cuda_times(experts, top_k, hidden, inter, t, reps)
    flops = 2 * t * top_k * hidden * 3 * inter
    device = torch.cuda.get_device_name()
    peak = (peak_tflops(device) or (None, None))[1]
    cols = "  ".join(
        f"{k} {v}" if isinstance(v, str) else f"{k} {flops / v / 1e12:6.1f} TFLOP/s"
        + (f" ({100 * flops / v / 1e12 / peak:.0f}% of peak)" if peak else "") for k, v in times.items())
    print(f"{device} bf16 {name:14s} T={t:5d}  {cols}")
    return {"device": device, "shape": name, "tokens": t,
            **{f"{k}_tflops": flops / v / 1e12 for k, v in times.items() if not isinstance(v, str)}}
