"""The ``moeray`` command line.

    moeray generate [--model DIR|ORG/NAME[@REV]] --prompt-ids 1,2,3 [--prompt-ids 4,5 ...] [--prompt TEXT ...]
                    --max-new-tokens N --workers W [--replicas R] [--dtype float32|bfloat16] [--json]
                    [--initial-plan FILE | --initial-load TRACE]
    moeray generate --target HOST:PORT --prompt-ids 1,2,3 ...     (calls a running server)
    moeray serve [--model DIR] [--port 9000] [--http-port 8000] [--workers N] [--routers N] [--address ADDR]
                 [--served-model-name NAME] [--api-key KEY] [--chat-template FILE] [--drain-timeout 30]
                 [--placement-config FILE] [--initial-plan FILE | --initial-load TRACE] [--micro-batches N|auto]
                 [--topology colocated|disaggregated] [--router-gpus N] [--transport NAME]
    moeray info [--model DIR]
    moeray bench layer [--tokens 16,256,2048] [--workers 2] [--breakdown-tokens 1]
    moeray bench kernels [--tokens 16,256,2048]
    moeray bench serve [--model DIR] [--concurrency 1,8,32] [--api grpc,http] [--micro-batches N|auto]
    moeray bench kv [--model medium] [--chunks 16,64]
    moeray bench placement [--windows 12]
    moeray bench heal [--model DIR] [--kills 5]
    moeray placement show | export --out FILE | rebalance [--dry-run] | policy NAME | record --out FILE | inspect
                                                                                              (a running server)
    moeray placement synth --kind zipf|drifting|bursty ... --out FILE
    moeray placement simulate --trace FILE --policy NAME[,NAME...] --workers N [--nodes M] [--redundant R] [--json]
    moeray placement simulate --trace FILE --config FILE --workers N ...   (the controller's own triggers)

With no --model, commands use the embedded demo checkpoint (created on first use). --model also takes a Hugging Face
hub id, org/name[@revision], resolved through huggingface_hub's cache (HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE).
"""

from __future__ import annotations

import argparse
import logging
import sys

from moeray.cli import bench, generate, placement, serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeray", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    generate.add_generate_parser(sub)
    serve.add_parser(sub)
    generate.add_info_parser(sub)
    bench.add_parser(sub)
    placement.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)
