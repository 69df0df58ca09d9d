"""``moeray bench spread``: do replicas share a hot expert live? Predicted against realized worker balance on a
skewed checkpoint, through the in-process engine.

The checkpoint is a gpt-oss whose router bias makes expert 0 nearly every token's first choice in every MoE layer
(moeray.model.tiny ``hot_expert``). The engine starts on the static round_robin plan, serves a warm-up batch, and
rebalances with the replicated policy (as the controller would on a skewed window); then it serves a measured batch
of greedy requests. For each MoE layer: the imbalance (max / mean worker pairs) the load model predicts of the plan
for the expert counts the routers saw, the imbalance the workers realized, and the routing gap between them
(max |realized - predicted| / mean predicted, GetLoad's ``routing_gap``).

Each replica rule (ControllerConfig.replica_rule) runs on the same requests; under 'least_loaded' the prediction
is the rule run on the window's counts as one step, so its gap measures how far step-by-step balancing lands from
balancing the window at once.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np
import torch

WORKERS, EXPERTS, TOP_K, LAYERS, HOT = 4, 16, 4, 4, 0


def make_checkpoint(path: str, seed: int = 0) -> str:
    from moeray.model.tiny import save_tiny_checkpoint

    return str(save_tiny_checkpoint("gpt_oss", path, seed=seed, hot_expert=HOT, num_local_experts=EXPERTS,
                                    num_experts_per_tok=TOP_K, num_hidden_layers=LAYERS))


def run_spread_bench(*, checkpoint: str | None = None, requests: int = 16, max_new_tokens: int = 32,
                     replicas: int = 8, seed: int = 0, rules: tuple[str, ...] = ("even", "least_loaded")) -> dict:
    from moeray import EngineConfig, LocalEngine, SamplingParams
    from moeray.placement.algorithms.load import worker_load_LW
    from moeray.placement.config import ControllerConfig

    out, started = {}, time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = checkpoint or make_checkpoint(os.path.join(tmp, "skewed"), seed)
        for rule in rules:
            rng = np.random.default_rng(seed)  # the same requests for each rule
            prompts = lambda: [rng.integers(3, 131, size=int(rng.integers(8, 40))).tolist()  # noqa: E731
                               for _ in range(requests)]
            sampling = SamplingParams(max_new_tokens=max_new_tokens)
            config = EngineConfig(model=path, backend="local", workers=WORKERS, replicas=replicas,
                                  controller=ControllerConfig(replica_rule=rule))
            with LocalEngine(config) as engine:
                engine.generate(prompts(), sampling)  # warm-up on round_robin: the window the rebalance reads
                record = engine.rebalance()
                engine.take_load()
                engine.generate(prompts(), sampling)
                expert_LE, worker_LW = engine.take_load()
                plan = engine.plan
                predicted_LW = worker_load_LW(torch.tensor(expert_LE), plan, rule).numpy()
            out[rule] = _report(rule, record, plan, expert_LE, worker_LW, predicted_LW, requests, max_new_tokens,
                                replicas)
    print(f"(bench ran {time.perf_counter() - started:.0f} s)")
    return out


def _report(rule, record, plan, expert_LE, worker_LW, predicted_LW, requests, max_new_tokens, replicas) -> dict:
    hot_replicas = [int(c) for c in plan.replica_count_LE[:, HOT].tolist()]
    ratio = lambda x_W: float(x_W.max() / x_W.mean())  # noqa: E731
    rows = [{"layer": l, "hot_share": float(expert_LE[l, HOT] / expert_LE[l].sum()), "hot_replicas": hot_replicas[l],
             "predicted": ratio(predicted_LW[l]), "realized": ratio(worker_LW[l]),
             "gap": float(np.abs(worker_LW[l] - predicted_LW[l]).max() / predicted_LW[l].mean())}
            for l in range(len(expert_LE))]
    print(f"\n## replica rule {rule}: gpt-oss, {EXPERTS} experts top-{TOP_K}, {LAYERS} MoE layers, expert {HOT} "
          f"hot; {WORKERS} workers, {replicas} redundant slots; replicated plan (rebalance "
          f"{record['expected_imbalance_before']:.3f} -> {record['expected_imbalance_after']:.3f} expected); "
          f"{requests} greedy requests x {max_new_tokens} tokens")
    print("| layer | hot expert's share of pairs | its replicas | predicted imbalance | realized imbalance "
          "| routing gap |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['layer']} | {r['hot_share']:.3f} | {r['hot_replicas']} | {r['predicted']:.4f} "
              f"| {r['realized']:.4f} | {r['gap']:.2%} |")
    mean = lambda key: float(np.mean([r[key] for r in rows]))  # noqa: E731
    print(f"| mean | {mean('hot_share'):.3f} | | {mean('predicted'):.4f} | {mean('realized'):.4f} "
          f"| {mean('gap'):.2%} |", flush=True)
    return {"rows": rows}
