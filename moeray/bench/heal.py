"""``moeray bench heal``: what a lost expert worker costs while requests flow.

One local Ray cluster with one fake GPU per worker, so a replacement worker takes the dead one's device, as on a
real cluster. For each kill: a bounded set of greedy requests is in flight, one worker process is killed (at a
random point), and the run measures

- **time to full service**: from the kill until the controller reports every expert on a live worker again and the
  worker list back at its target (a replacement started, placed and loaded), polled every 20 ms;
- **extra latency of requests in flight**: each request's latency minus the same request's latency in an
  undisturbed run of the same batch measured just before (the baseline), and whether its output was identical.

Both with no replicas (every expert once: the steps that need a lost expert wait for the replacement) and with
every expert replicated once (the survivors take over within the step; the replacement restores redundancy).

``--victim router``: two routers, the requests streamed (``Engine.stream``) over both, and one router killed: its
requests go on at the other from the tokens they had (moeray/serving/engine_handle.py does the same for the
ingress); time to full service is until Ray has the killed router answering again.
"""

from __future__ import annotations

import functools
import random
import statistics
import time


def _healed(engine, workers: int) -> bool:
    import ray

    health = ray.get(engine.controller.health.remote())
    return health["serving"] and health["live_workers"] == workers and health["state"] == "idle" and \
        not health["dead_workers"]


def _timed_batch(engine, prompts, sampling) -> tuple[list[list[int]], list[float]]:
    import ray

    started = time.perf_counter()
    refs = [engine.submit(p, sampling, router=i) for i, p in enumerate(prompts)]
    outputs, latency = [None] * len(refs), [0.0] * len(refs)
    pending = {ref: i for i, ref in enumerate(refs)}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=600)
        for ref in ready:
            i = pending.pop(ref)
            outputs[i], latency[i] = ray.get(ref).output_ids, time.perf_counter() - started
    return outputs, latency


def _timed_streams(engine, prompts, sampling) -> tuple[list[list[int]], list[float]]:
    """As ``_timed_batch``, each request streamed (``Engine.stream`` moves one whose router dies)."""
    import concurrent.futures

    started = time.perf_counter()

    def one(i: int) -> tuple[list[int], float]:
        tokens = [t for chunk in engine.stream(prompts[i], sampling, router=i) for t in chunk.token_ids]
        return tokens, time.perf_counter() - started

    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        done = list(pool.map(one, range(len(prompts))))
    return [d[0] for d in done], [d[1] for d in done]


def _answers(actor) -> bool:
    import ray

    try:
        return ray.get(actor.ping.remote(), timeout=5)
    except ray.exceptions.RayError:
        return False


def _one_kill(engine, prompts, sampling, rng, workers: int, victim: str = "worker") -> dict:
    import threading

    import ray

    batch = _timed_streams if victim == "router" else _timed_batch
    expected, base = batch(engine, prompts, sampling)
    result: dict = {}

    def kill() -> None:
        time.sleep(rng.uniform(0.2, 0.6) * max(base))  # somewhere mid-batch
        if victim == "router":
            router = engine.routers[rng.randrange(len(engine.routers))]
            ray.kill(router, no_restart=False)
            healed = functools.partial(_answers, router)
        else:
            ray.kill(ray.get(engine.controller.workers.remote())[rng.randrange(workers)])
            healed = functools.partial(_healed, engine, workers)
        killed = time.perf_counter()
        while not healed() or time.perf_counter() - killed < 0.05:
            time.sleep(0.02)
        result["heal_s"] = time.perf_counter() - killed

    killer = threading.Thread(target=kill)
    killer.start()
    outputs, latency = batch(engine, prompts, sampling)
    killer.join()
    extra = [a - b for a, b in zip(latency, base)]
    return {"heal_s": result["heal_s"], "extra_s_max": max(extra), "extra_s_mean": statistics.fmean(extra),
            "baseline_s": max(base), "identical": outputs == expected}


def run_heal_bench(model: str, *, workers: int = 3, kills: int = 5, requests: int = 8,
                   max_new_tokens: int = 48, victim: str = "worker") -> list[dict]:
    import ray

    from moeray import Engine, EngineConfig, SamplingParams
    from moeray.model.backbone import inspect_checkpoint

    num_experts = inspect_checkpoint(model).spec.num_experts
    ray.init(address="local", num_cpus=2, num_gpus=workers, include_dashboard=False, log_to_driver=False)
    sampling = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
    rng = random.Random(0)
    prompts = [[5 + i, 6 + i, 7 + i, 40 + 3 * i] for i in range(requests)]
    rows = []
    try:
        setups = ((0, 2, "2 routers, one killed"),) if victim == "router" else \
            ((0, 1, "no replicas"), (num_experts, 1, "every expert twice"))
        for replicas, routers, label in setups:
            config = EngineConfig(model=model, workers=workers, use_gpus=True, router_threads=1, replicas=replicas,
                                  routers=routers)
            with Engine(config) as engine:
                engine.generate(prompts[:2], sampling)  # warm up
                runs = [_one_kill(engine, prompts, sampling, rng, workers, victim) for _ in range(kills)]
            heal = [r["heal_s"] for r in runs]
            row = {"setup": label, "kills": kills, "heal_s_p50": statistics.median(heal), "heal_s_max": max(heal),
                   "extra_s_p50": statistics.median(r["extra_s_max"] for r in runs),
                   "extra_s_max": max(r["extra_s_max"] for r in runs),
                   "baseline_batch_s": statistics.median(r["baseline_s"] for r in runs),
                   "identical_outputs": sum(r["identical"] for r in runs)}
            rows.append(row)
            print(f"{label:20s} {kills} kills: time to full service p50 {row['heal_s_p50']:.2f} s (max "
                  f"{row['heal_s_max']:.2f}); in-flight requests' extra latency p50 {row['extra_s_p50']:.2f} s (max "
                  f"{row['extra_s_max']:.2f}) on a {row['baseline_batch_s']:.2f} s undisturbed batch; outputs "
                  f"identical in {row['identical_outputs']}/{kills} runs", flush=True)
    finally:
        ray.shutdown()
    print(f"moeray bench heal: a {victim} killed; {workers} workers (one fake GPU each), {requests} greedy requests of "
          f"{max_new_tokens} tokens in flight per kill; p50 over kills, per-run extra latency = the slowest request's "
          f"latency minus its undisturbed latency")
    return rows
