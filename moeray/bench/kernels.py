"""``moeray bench kernels``: the grouped expert computation alone, moeray's kernels vs transformers' experts.

CPU (always): moeray's torch path (on experts packed as CPU workers hold them, and on the canonical layout) vs
transformers' eager loop and every other implementation registered in ``ALL_EXPERTS_FUNCTIONS`` that runs on CPU,
as ratios, and achieved GFLOP/s against the floor: one plain ``torch.mm`` of the same FLOPs ([T*k, H] x [H, 3I]).
CUDA (when a GPU is present): Triton vs the torch path vs ``torch._grouped_mm``, TFLOP/s and percent of the
device's peak. All in one run, on the same inputs.
"""

from __future__ import annotations

import statistics
import time

import torch
import transformers
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from moeray.kernels import ExpertWeights, GatedActivation, PackedExpertWeights, cpu_rows, grouped_experts_torch

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
    return row


def _cuda_row(name, experts, top_k, hidden, inter, t, reps) -> dict:
    from moeray.kernels.triton_grouped import grouped_experts_triton

    dtype = torch.bfloat16
    module, x_TH, top_i, top_w = _inputs(t, experts, top_k, hidden, inter, "cuda", dtype)
    weights = ExpertWeights(w_gate_up_S2IH=module.gate_up_proj.data, w_down_SHI=module.down_proj.data)
    pair_token = torch.arange(t, device="cuda").repeat_interleave(top_k)
    args = (x_TH, pair_token, top_i.reshape(-1), top_w.reshape(-1), weights, GatedActivation())
    flops = 2 * t * top_k * hidden * 3 * inter
    sync = torch.cuda.synchronize
    times = {"triton": _timed(lambda: grouped_experts_triton(*args), reps, sync),
             "torch path": _timed(lambda: grouped_experts_torch(*args), reps, sync)}
    module.config._experts_implementation = "grouped_mm"
    times["hf grouped_mm (torch._grouped_mm)"] = _timed(lambda: module(x_TH, top_i, top_w), reps, sync)
    device = torch.cuda.get_device_name()
    peak = next((p[1] for k, p in PEAK_TFLOPS.items() if k in device), None)
    cols = "  ".join(f"{k} {flops / v / 1e12:6.1f} TFLOP/s" + (f" ({100 * flops / v / 1e12 / peak:.0f}% of peak)"
                                                               if peak else "") for k, v in times.items())
    print(f"{device} bf16 {name:14s} T={t:5d}  {cols}")
    return {"device": device, "shape": name, "tokens": t, **{f"{k}_tflops": flops / v / 1e12 for k, v in times.items()}}
