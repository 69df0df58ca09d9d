#!/usr/bin/env python3
"""``make gpu-check``: moeray's Triton kernels checked, then timed, on one GPU, in one command.

Runs with the machine's own Python (torch, triton, transformers, safetensors, tokenizers; no Ray, no pytest, no
network): moeray is imported from this checkout, not installed. Where ``.gpu-wheels/`` is present (``make
gpu-wheels``, carried), the locked versions in it are installed first, so transformers is the tested one.

1. Correctness on CUDA against ``reference_experts`` (fp32, on the CPU): Triton on plain fp32 and bf16 experts,
   FP8 block-scaled (blocks 128x128, 16x16, 8x4 and 1x48, partial edge blocks), MXFP4; quantized experts are
   expanded for the reference by transformers' own dequantization, as tests/kernels/test_triton_quantized.py does.
   Sizes are not block multiples; decode and prefill tilings, the combine kernel and the atomic combine all run.
2. Timings, bf16 activations: mixtral-like and deepseek-like layers at T = 16, 256, 2048 through Triton (plain,
   FP8 128x128, MXFP4), the torch path and transformers' grouped_mm experts (``torch._grouped_mm``): TFLOP/s and
   percent of the GPU's bf16 peak (moeray/bench/kernels.py times them).
3. The in-process engine (``EngineConfig(backend="local")``), between the two: greedy ids and logits equal
   transformers' on the same GPU for the demo checkpoint (built if absent, ~25 s) and a tiny checkpoint of each of
   the six architectures; decode and prefill tokens/s against transformers' ``generate`` (scripts/gpu_check_engine.py).
   It gets at most ENGINE_BUDGET_S of the budget; the timings of 2. have the rest.

One table at the end. Exit status: 1 if a check failed, 2 if a required module is missing, 0 otherwise (also on a
machine without a GPU, where nothing is checked). Past the time budget (--budget-s, 6 minutes) the remaining
timings are skipped, and said to be; 3 minutes later still (a hung kernel), a watchdog prints the table so far and
exits 1.
``--interpret`` runs the correctness section on CPU tensors under TRITON_INTERPRET=1 at tiny sizes, no timings, and
the engine section on the CPU at toy sizes. ``--section kernels|engine`` runs one section alone. Ray and
OpenTelemetry are kept out of the process (the GPU machines this runs on have neither), so a run here proves none
is needed.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import os
import sys
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = ("torch", "triton", "transformers", "safetensors", "tokenizers")  # module name == wheel name
TOKENS = (16, 256, 2048)
WATCHDOG_S = 180
ENGINE_BUDGET_S = 150.0  # the engine section's share of --budget-s
SECTIONS = ("all", "kernels", "engine")


@dataclasses.dataclass
class Row:
    check: str
    result: str  # PASS, FAIL, SKIP, TIME, N/A
    detail: str = ""


def missing_modules() -> list[str]:
    return [name for name in REQUIRED if importlib.util.find_spec(name) is None]


def import_moeray_kernels():
    """``moeray.kernels`` from this checkout, installed or not: ``moeray/kernels`` links to the top-level kernels/."""
    sys.path.insert(0, str(ROOT))
    import moeray.kernels.api  # NOTE: no Ray: moeray imports its engine lazily

    return moeray.kernels.api


# -- 1. correctness -----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    fmt: str  # "plain", "fp8", "mxfp4"
    block: tuple[int, int] | None
    dtype: str  # activations: "float32", "bfloat16"
    tokens: int
    hidden: int
    inter: int
    slots: int
    top_k: int
    bias: bool
    clamped: bool  # GPT-OSS's clamped SwiGLU, else SiLU
    interleaved: bool
    deterministic: bool = True

    @property
    def name(self) -> str:
        fmt = self.fmt if self.block is None or self.fmt == "mxfp4" else f"fp8 {self.block[0]}x{self.block[1]}"
        act = "clamped" if self.clamped else "silu"
        extras = ["bias"] * self.bias + ["interleaved"] * self.interleaved + ["atomic"] * (not self.deterministic)
        return (f"{fmt} {self.dtype} T={self.tokens} H={self.hidden} I={self.inter} E={self.slots} k={self.top_k} "
                f"{act}" + "".join(f" {e}" for e in extras))

    @property
    def tiny(self) -> bool:  # small enough for the interpreter
        return self.tokens <= 33 and self.hidden * self.inter <= 96 * 200


CASES = [
    Case("plain", None, "float32", 33, 96, 200, 8, 2, True, True, True),
    Case("plain", None, "float32", 300, 96, 200, 8, 2, False, False, False, deterministic=False),
    Case("plain", None, "bfloat16", 33, 96, 200, 8, 2, True, True, True),
    Case("plain", None, "bfloat16", 300, 320, 200, 8, 4, False, False, False),
    Case("fp8", (128, 128), "float32", 300, 320, 200, 8, 2, True, False, False),
    Case("fp8", (16, 16), "float32", 33, 40, 24, 8, 4, False, True, True, deterministic=False),
    Case("fp8", (8, 4), "float32", 7, 40, 24, 4, 2, True, False, False),
    Case("fp8", (1, 48), "float32", 1, 40, 24, 2, 1, True, True, False),
    Case("fp8", (128, 128), "bfloat16", 300, 320, 200, 8, 2, False, True, True),
    Case("fp8", (16, 16), "bfloat16", 33, 40, 24, 8, 2, True, False, False),
    Case("mxfp4", (1, 32), "float32", 7, 64, 32, 4, 2, True, True, True),
    Case("mxfp4", (1, 32), "float32", 33, 64, 32, 8, 4, False, False, False, deterministic=False),
    Case("mxfp4", (1, 32), "bfloat16", 300, 192, 160, 8, 2, True, True, True),
    Case("mxfp4", (1, 32), "bfloat16", 33, 64, 32, 8, 2, False, False, False),
]


def quantized(w, fmt: str, block, dtype):
    """Every slot of ``w`` (ExpertWeights, CPU) quantized by moeray's quantizers; biases in ``dtype``."""
    from moeray.kernels.api import ExpertQuant
    from moeray.kernels.quantized import quantize_experts

    return quantize_experts(w, ExpertQuant(format=fmt, block=block), dtype)


def reference_weights(qw):
    """float32 experts expanded by transformers' dequantization, or moeray's where this transformers lacks it;
    with the name of the one used."""
    import torch
    from moeray.kernels.api import ExpertWeights

    try:
        if qw.quant.format == "fp8":
            from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

            expand = lambda q, s: _dequantize_fp8_weight(q.clone(), s, list(qw.quant.block), torch.float32)
        else:
            from transformers.integrations.mxfp4 import convert_moe_packed_tensors

            def expand(q, s):
                blocks = q.reshape(q.shape[0], q.shape[1], q.shape[2] // 16, 16)
                return convert_moe_packed_tensors(blocks, s, dtype=torch.float32).transpose(1, 2).contiguous()
    except ImportError:
        return converted(qw.dequantized(), "cpu", torch.float32), "moeray dequantize"
    as_f32 = lambda t: None if t is None else t.float()
    return ExpertWeights(w_gate_up_S2IH=expand(qw.q_gate_up, qw.s_gate_up), w_down_SHI=expand(qw.q_down, qw.s_down),
                         b_gate_up_S2I=as_f32(qw.b_gate_up_S2I), b_down_SH=as_f32(qw.b_down_SH),
                         interleaved=qw.interleaved), "transformers dequantize"


def converted(weights, device, dtype=None):
    """Experts (ExpertWeights or QuantizedExpertWeights) with every tensor on ``device``; floating-point tensors
    of ExpertWeights also in ``dtype`` when given."""
    import torch

    def convert(t):
        return t.to(device, dtype) if dtype is not None and t.is_floating_point() else t.to(device)

    tensors = {f.name: getattr(weights, f.name) for f in dataclasses.fields(weights)}
    return dataclasses.replace(weights, **{k: convert(t) for k, t in tensors.items() if isinstance(t, torch.Tensor)})


def run_case(case: Case, device: str) -> Row:
    import torch
    from cases import make_case  # tests/kernels/cases.py: torch and moeray.kernels only
    from moeray.kernels.api import CLAMPED_SWIGLU, GatedActivation, reference_experts
    from moeray.kernels.triton_grouped import grouped_experts_triton

    dtype = getattr(torch, case.dtype)
    act = GatedActivation(kind=CLAMPED_SWIGLU, limit=0.6) if case.clamped else GatedActivation()
    x, pt, ps, pw, w = make_case(case.tokens, case.hidden, case.inter, case.slots, case.top_k, case.bias,
                                 interleaved=case.interleaved)
    if dtype != torch.float32:  # activations and biases / 10, as tests/kernels do for half precision
        x = x / 10
        if case.bias:
            w = dataclasses.replace(w, b_gate_up_S2I=w.b_gate_up_S2I / 10, b_down_SH=w.b_down_SH / 10)
    if case.fmt == "plain":  # the reference on the same values, rounded to the activations' dtype
        weights = converted(w, "cpu", dtype)
        ref_w, ref_name = converted(weights, "cpu", torch.float32), "the same experts"
    else:
        weights = quantized(w, case.fmt, case.block, dtype)
        ref_w, ref_name = reference_weights(weights)
    want = reference_experts(x.to(dtype).float(), pt, ps, pw, ref_w, act)
    got = grouped_experts_triton(x.to(device, dtype), pt.to(device), ps.to(device), pw.to(device),
                                 converted(weights, device), act, deterministic=case.deterministic)
    if got.dtype != dtype:
        return Row(case.name, "FAIL", f"result is {got.dtype}, not {dtype}")
    atol, rtol = (1e-4, 1e-4) if dtype == torch.float32 else (2e-2, 0.0)
    err = (got.float().cpu() - want).abs().max().item()
    ok = torch.allclose(got.float().cpu(), want, atol=atol, rtol=rtol)
    return Row(case.name, "PASS" if ok else "FAIL", f"max err {err:.2e} (atol {atol:g}, rtol {rtol:g}) vs {ref_name}")


def routing_row(device: str) -> Row:
    """``moeray.kernels.api.grouped_experts`` sends quantized CUDA experts to Triton: bitwise its result."""
    import torch
    from cases import make_case
    from moeray.kernels.api import GatedActivation, grouped_experts
    from moeray.kernels.triton_grouped import grouped_experts_triton

    name = "routing: grouped_experts(fp8 on CUDA) is Triton"
    if device != "cuda":
        return Row(name, "SKIP", "CUDA only")
    x, pt, ps, pw, w = make_case(33, 320, 200, 8, 2, bias=True)
    weights = converted(quantized(w, "fp8", (128, 128), torch.bfloat16), device)
    args = (x.to(device, torch.bfloat16), pt.to(device), ps.to(device), pw.to(device), weights, GatedActivation())
    same = torch.equal(grouped_experts(*args), grouped_experts_triton(*args))
    return Row(name, "PASS" if same else "FAIL", "bitwise equal" if same else "differs: not routed to Triton?")


# -- 2. timings ---------------------------------------------------------------------------------------------------


def add_timing_rows(rows: list[Row], deadline: float, device: str, shapes, tokens, reps: int, note: str = ""):
    """One row per (shape, T, implementation) added to ``rows`` as it is timed: TFLOP/s and percent of the bf16
    peak, or why there is none."""
    import torch
    from moeray.bench.kernels import CUDA_IMPLS, cuda_times, peak_tflops

    peak = (peak_tflops(torch.cuda.get_device_name()) or (None, None))[1] if device == "cuda" else None
    for name, experts, top_k, hidden, inter in shapes:
        for t in tokens:
            label = f"time {name} T={t}"
            if time.monotonic() > deadline:
                rows.extend(Row(f"{label} {impl}", "SKIP", "past the time budget") for impl in CUDA_IMPLS)
                continue
            t0 = time.monotonic()
            times = cuda_times(experts, top_k, hidden, inter, t, reps, device=device, deadline=deadline)
            flops = 2 * t * top_k * hidden * 3 * inter
            for impl, v in times.items():
                if isinstance(v, str):
                    optional = impl.startswith("hf ")  # transformers' grouped_mm varies with versions and devices
                    result = "SKIP" if v.startswith("skipped") else ("N/A" if optional else "FAIL")
                    rows.append(Row(f"{label} {impl}", result, v.removeprefix("skipped: ")[:160]))
                    continue
                tflops = flops / v / 1e12
                pct = f", {100 * tflops / peak:.1f}% of bf16 peak" if peak else ""
                rows.append(Row(f"{label} {impl}", "TIME", f"{tflops:7.2f} TFLOP/s{pct}, {v * 1e3:.3f} ms{note}"))
            print(f"  timed {name} T={t} in {time.monotonic() - t0:.1f} s", flush=True)


def add_kernel_timings(rows: list[Row], deadline: float, device: str, args) -> None:
    try:
        from moeray.bench.kernels import SHAPES
    except Exception as e:  # noqa: BLE001 - e.g. a transformers without the experts registry
        rows.append(Row("timings", "FAIL", f"cannot import moeray.bench.kernels: {type(e).__name__}: {e}"[:160]))
        return
    if args.interpret:  # the timing code run once at a toy size: no measurement
        add_timing_rows(rows, deadline, device, [("toy", 4, 2, 64, 32)], [4], 1, note=" (interpreter smoke)")
    else:
        add_timing_rows(rows, deadline, device, SHAPES, TOKENS, args.reps)


# -- 3. the in-process engine --------------------------------------------------------------------------------------


def add_engine_rows(rows: list[Row], deadline: float, device: str, smoke: bool) -> None:
    """scripts/gpu_check_engine.py's rows, each added (and printed) as it is checked."""
    def add(check: str, result: str, detail: str) -> None:
        rows.append(Row(check, result, detail))
        print(f"  {result} {check}: {detail}", flush=True)

    if str(ROOT / "scripts") not in sys.path:
        sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gpu_check_engine  # beside this script
    except Exception as e:  # noqa: BLE001 - e.g. a moeray module that needs what this machine lacks
        traceback.print_exc()
        add("engine", "FAIL", f"cannot import the engine checks: {type(e).__name__}: {e}"[:160])
        return
    gpu_check_engine.run(device, deadline, add, smoke=smoke)


# -- main ---------------------------------------------------------------------------------------------------------


def print_table(rows: list[Row]) -> None:
    width = max(len(r.check) for r in rows)
    print()
    print(f"{'check':{width}}  result  detail")
    print(f"{'-' * width}  ------  {'-' * 60}")
    for r in rows:
        print(f"{r.check:{width}}  {r.result:6}  {r.detail}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--interpret", action="store_true",
                        help="kernel correctness on CPU tensors under TRITON_INTERPRET=1, tiny sizes; the engine on "
                             "the CPU, toy sizes; no measurements")
    parser.add_argument("--budget-s", type=float, default=360.0, help="skip timings past this many seconds")
    parser.add_argument("--reps", type=int, default=10, help="timed repetitions per implementation")
    parser.add_argument("--section", choices=SECTIONS, default="all",
                        help="the Triton kernels (1. and 2.) or the in-process engine (3.) alone")
    args = parser.parse_args(argv)
    # NOTE: None in sys.modules makes any import of them fail, as it does on the GPU machines (no Ray, no
    # OpenTelemetry): a run on a machine that has them still proves the checks need neither.
    for name in ("ray", "opentelemetry"):
        sys.modules.setdefault(name, None)
    start = time.monotonic()
    deadline = start + args.budget_s
    if args.interpret:  # NOTE: before anything imports triton
        os.environ["TRITON_INTERPRET"] = "1"

    if (ROOT / ".gpu-wheels").is_dir():  # `make gpu-wheels`, carried: the locked transformers and what it needs
        import gpu_wheels  # beside this script

        if gpu_wheels.install() != 0:
            print("gpu-check: installing .gpu-wheels failed (pip's message above)", file=sys.stderr)
            return 2
        importlib.invalidate_caches()
    missing = missing_modules()
    if missing:
        for name in missing:
            print(f"gpu-check: missing required module {name!r}: install the {name!r} wheel "
                  f"(pip install {name})", file=sys.stderr)
        return 2
    import torch

    if not args.interpret and not torch.cuda.is_available():
        print("gpu-check: no GPU: nothing checked (torch.cuda.is_available() is False; "
              "`python3 scripts/gpu_check.py --interpret` runs the correctness checks on the CPU)")
        return 0
    device = "cpu" if args.interpret else "cuda"
    import_moeray_kernels()
    sys.path.insert(0, str(ROOT / "tests" / "kernels"))
    import transformers
    import triton

    where = "CPU, TRITON_INTERPRET=1" if args.interpret else torch.cuda.get_device_name()
    print(f"gpu-check on {where}: torch {torch.__version__}, triton {triton.__version__}, "
          f"transformers {transformers.__version__}, budget {args.budget_s:.0f} s")

    rows: list[Row] = []

    def watchdog():  # NOTE: a thread, not a signal: a kernel blocked inside CUDA never returns to a signal handler
        print_table(rows + [Row("watchdog", "FAIL", f"over {args.budget_s + WATCHDOG_S:.0f} s: the rest was not run")])
        sys.stdout.flush()
        os._exit(1)

    timer = threading.Timer(max(0.0, deadline + WATCHDOG_S - time.monotonic()), watchdog)
    timer.daemon = True
    timer.start()
    kernels = args.section in ("all", "kernels")
    for case in CASES if kernels else ():
        if args.interpret and not case.tiny:
            continue
        t0 = time.monotonic()
        try:
            row = run_case(case, device)
        except Exception as e:  # noqa: BLE001 - a crash is this check's FAIL; the others still run
            traceback.print_exc()
            row = Row(case.name, "FAIL", f"{type(e).__name__}: {e}"[:160])
        row.detail += f" [{time.monotonic() - t0:.1f} s]"
        print(f"  {row.result} {row.check}: {row.detail}", flush=True)
        rows.append(row)
    try:
        if kernels:
            rows.append(routing_row(device))
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        rows.append(Row("routing: grouped_experts(fp8 on CUDA) is Triton", "FAIL", f"{type(e).__name__}: {e}"[:160]))
    if args.section in ("all", "engine"):
        add_engine_rows(rows, min(deadline, time.monotonic() + ENGINE_BUDGET_S), device, smoke=args.interpret)
    if kernels:
        add_kernel_timings(rows, deadline, device, args)
    timer.cancel()
    if any(r.result == "SKIP" and r.detail == "past the time budget" for r in rows):
        print(f"\ngpu-check: the time budget ({args.budget_s:.0f} s) ran out: the remaining timings were skipped")
    print_table(rows)
    failed = [r for r in rows if r.result == "FAIL"]
    print(f"\n{len(rows)} rows, {len(failed)} failed, {time.monotonic() - start:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
