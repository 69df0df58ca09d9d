"""``make gpu-check``'s engine section: the in-process engine (``EngineConfig(backend="local")``, no Ray) on the GPU
against transformers on the same GPU.

1. Correctness, float32: for the demo checkpoint (built on first use, about 25 s on a CPU, cached under
   $MOERAY_HOME) and a tiny seeded checkpoint of each of the six architectures (moeray.model.tiny, as the tests make
   them): greedy ids of four prompts (16 new tokens, batched) equal transformers' ``generate`` one prompt at a time,
   and one prompt's logits are within 1e-4 relative of transformers' forward.
2. Throughput on the demo checkpoint, 1 worker: decode (many short prompts, many new tokens; new tokens/s) and
   prefill (long prompts, one new token; prompt tokens/s), against transformers' ``generate`` on the same prompts as
   one batch: the faster of TIMED_RUNS runs, after an untimed run of the same.

``run(device, deadline, add, smoke)`` adds one row per check through ``add(check, result, detail)``; past
``deadline`` the rest are skipped and said to be. A transformers outside pyproject.toml's range gets one N/A row
instead, naming it: the engine drives models through arguments older releases lack (in 5.17, which a GPU image was
seen with, the cache argument is still ``past_key_values``): ``pip install 'transformers>=5.20'``, or on an offline
machine its wheel (pure Python; its other requirements were all there). ``smoke`` (``gpu_check.py --interpret``):
the same code on the CPU at toy sizes, so this section is known to work before a GPU is at hand
(tests/unit/test_gpu_check_engine.py).
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
import tomllib
import traceback
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25], [30],
           [40, 41, 42, 43, 44, 45, 46]]  # tests/conftest.py's
NEW_TOKENS = 16
LOGITS_REL = 1e-4  # docs/architecture.md: float32 logits within 1e-4 relative of transformers'
TIMED_RUNS = 2  # per throughput figure, after one untimed run: the faster counts

Add = Callable[[str, str, str], None]


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str  # "decode" or "prefill"
    batch: int  # prompts, sent together
    prompt_len: int
    new_tokens: int

    @property
    def tokens(self) -> int:
        """The tokens a run produces (decode) or reads (prefill): what tokens/s counts."""
        return self.batch * (self.new_tokens if self.name == "decode" else self.prompt_len)


WORKLOADS = [Workload("decode", 32, 16, 64), Workload("prefill", 16, 512, 1)]
SMOKE_WORKLOADS = [Workload("decode", 4, 8, 8), Workload("prefill", 2, 32, 1)]


class Reference:
    """transformers running a checkpoint on ``device``: the oracle, as tests/conftest.py's Oracle on the CPU."""

    def __init__(self, path: str, device: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.torch, self.device = torch, device
        from moeray.model.quant import reference_load_kwargs

        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                          **reference_load_kwargs(path)).to(device).eval()
        eos = self.model.generation_config.eos_token_id
        self.eos = {eos} if isinstance(eos, int) else set(eos or [])
        self.pad = self.model.generation_config.pad_token_id or 0

    def greedy(self, prompt: list[int]) -> list[int]:
        with self.torch.no_grad():
            out = self.model.generate(self.torch.tensor([prompt], device=self.device), max_new_tokens=NEW_TOKENS,
                                      do_sample=False, pad_token_id=self.pad)
        new = out[0, len(prompt):].tolist()
        stop = next((i for i, t in enumerate(new) if t in self.eos), None)  # moeray stops at EOS; generate pads
        return new if stop is None else new[: stop + 1]

    def logits(self, prompt: list[int]):
        with self.torch.no_grad():
            return self.model(self.torch.tensor([prompt], device=self.device)).logits[0].float().cpu()

    def timed_generate(self, prompts_BL, new_tokens: int) -> float:
        """Seconds for one ``generate`` of the batch, exactly ``new_tokens`` each."""
        ids = self.torch.tensor(prompts_BL, device=self.device)
        sync = self.torch.cuda.synchronize if self.device == "cuda" else (lambda: None)
        started = time.perf_counter()
        with self.torch.no_grad():
            self.model.generate(ids, attention_mask=self.torch.ones_like(ids), max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, do_sample=False, pad_token_id=self.pad)
        sync()
        return time.perf_counter() - started


def local_engine(path: str, **kwargs):
    from moeray import Engine, EngineConfig

    return Engine(EngineConfig(model=path, backend="local", **kwargs))


def first_difference(got: list[list[int]], want: list[list[int]]) -> str:
    for i, (g, w) in enumerate(zip(got, want)):
        if g != w:
            j = next((j for j, (a, b) in enumerate(zip(g, w)) if a != b), min(len(g), len(w)))
            return (f"prompt {i} differs at new token {j}: got {g[j:j + 4]}..., transformers {w[j:j + 4]}... "
                    f"(lengths {len(g)} and {len(w)})")
    return "equal"


def check_greedy(name: str, path: str, device: str, engine_kwargs: dict) -> tuple[str, str]:
    """(result, detail) of one checkpoint's greedy ids and logits against transformers on ``device``."""
    import torch
    from moeray import SamplingParams

    ref = Reference(path, device)
    want = [ref.greedy(p) for p in PROMPTS]
    want_logits = ref.logits(PROMPTS[1])
    del ref
    with local_engine(path, **engine_kwargs) as engine:
        got = [r.output_ids for r in engine.generate(PROMPTS, SamplingParams(max_new_tokens=NEW_TOKENS))]
        got_logits = torch.from_numpy(engine.score([PROMPTS[1]])[0])
        where = str(engine.workers[0].device)
    rel = (got_logits - want_logits).abs().max().item() / want_logits.abs().max().item()
    same = got == want
    detail = (f"{len(PROMPTS)} prompts x {NEW_TOKENS} tokens: {first_difference(got, want)}; logits max rel err "
              f"{rel:.1e} (limit {LOGITS_REL:g}); experts on {where}")
    return ("PASS" if same and rel <= LOGITS_REL else "FAIL"), detail


def time_workload(path: str, device: str, work: Workload, seed: int = 0) -> str:
    """The detail of one throughput row: moeray's and transformers' tokens/s on the same prompts."""
    import torch
    from moeray import SamplingParams
    from moeray.router.kv_config import KVCacheConfig

    gen = torch.Generator().manual_seed(seed)
    ref = Reference(path, device)
    vocab = ref.model.config.vocab_size
    # ids above the special tokens (the demo's are 0-4), so no prompt holds an EOS
    prompts = torch.randint(8, vocab, (work.batch, work.prompt_len), generator=gen).tolist()
    ref.timed_generate(prompts, work.new_tokens)  # warm-up: the same run, untimed (kernels chosen, caches sized)
    hf_s = min(ref.timed_generate(prompts, work.new_tokens) for _ in range(TIMED_RUNS))
    del ref
    kv = KVCacheConfig(max_prefill_tokens=2048)  # a GPU step can take more prompt tokens than the CPU default
    with local_engine(path, workers=1, max_batch_size=max(32, work.batch), kv_cache=kv) as engine:
        sampling = SamplingParams(max_new_tokens=work.new_tokens, ignore_eos=True)
        engine.generate(prompts, sampling)  # warm-up, untimed: Triton compiles its kernels here
        moeray_s = float("inf")
        for _ in range(TIMED_RUNS):
            started = time.perf_counter()
            results = engine.generate(prompts, sampling)
            moeray_s = min(moeray_s, time.perf_counter() - started)
    assert all(len(r.output_ids) == work.new_tokens for r in results)
    mine, theirs = work.tokens / moeray_s, work.tokens / hf_s
    return (f"moeray {mine:,.0f} tok/s ({moeray_s * 1e3:.0f} ms), transformers generate {theirs:,.0f} tok/s "
            f"({hf_s * 1e3:.0f} ms): {mine / theirs:.2f}x; 1 worker, float32")


def demo_path() -> tuple[str, str]:
    """The demo checkpoint's directory, built if absent, and how it was had."""
    from moeray.model import demo

    started, existed = time.monotonic(), (demo.demo_checkpoint_dir() / "config.json").exists()
    path = demo.ensure_demo_checkpoint()
    how = "cached" if existed else f"built in {time.monotonic() - started:.0f} s"
    return str(path), how


def transformers_out_of_range() -> str | None:
    """Why this transformers cannot run the engine (outside pyproject.toml's range), or None when it can."""
    import transformers
    from packaging.requirements import Requirement

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    wanted = next(Requirement(d) for d in deps if Requirement(d).name == "transformers").specifier
    if wanted.contains(transformers.__version__, prereleases=True):
        return None
    return (f"transformers {transformers.__version__} is outside moeray's {wanted} (pyproject.toml): the engine "
            "calls models through arguments that release lacks; install one in range to check it")


def run(device: str, deadline: float, add: Add, smoke: bool = False) -> None:
    """Every row of this section, added as it is checked."""
    why = transformers_out_of_range()
    if why is not None:
        add(f"engine: the in-process engine ({device})", "N/A", why)
        return
    from moeray.model.tiny import ARCHITECTURES, save_tiny_checkpoint

    def guarded(check: str, fn) -> None:
        if time.monotonic() > deadline:
            add(check, "SKIP", "past the time budget")
            return
        t0 = time.monotonic()
        try:
            result, detail = fn()
        except Exception as e:  # noqa: BLE001 - a crash is this check's FAIL; the others still run
            traceback.print_exc()
            result, detail = "FAIL", f"{type(e).__name__}: {e}"[:200]
        add(check, result, f"{detail} [{time.monotonic() - t0:.1f} s]")

    demo: dict[str, str] = {}

    def check_demo() -> tuple[str, str]:
        demo["path"], how = demo_path()
        result, detail = check_greedy("demo", demo["path"], device, {"workers": 2, "replicas": 1})
        return result, f"{detail}; checkpoint {how}"

    guarded(f"engine greedy == transformers: demo ({device})", check_demo)
    with tempfile.TemporaryDirectory(prefix="moeray-gpu-check-") as tmp:
        for arch in ARCHITECTURES:
            def check_arch(arch=arch) -> tuple[str, str]:
                path = save_tiny_checkpoint(arch, Path(tmp) / arch, seed=ARCHITECTURES.index(arch))
                return check_greedy(arch, str(path), device, {"workers": 2, "replicas": 2})

            guarded(f"engine greedy == transformers: tiny {arch} ({device})", check_arch)
    for work in SMOKE_WORKLOADS if smoke else WORKLOADS:
        check = f"engine {work.name} demo B={work.batch} L={work.prompt_len} N={work.new_tokens} ({device})"

        def timed(work=work) -> tuple[str, str]:
            if "path" not in demo:
                raise RuntimeError("the demo checkpoint is not there (its greedy check failed first)")
            detail = time_workload(demo["path"], device, work)
            return "TIME", detail + (" (CPU smoke: no measurement)" if smoke else "")

        guarded(check, timed)
