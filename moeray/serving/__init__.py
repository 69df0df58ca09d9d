"""gRPC serving: the public contract's generated stubs (``gen/``, from protos/ by scripts/gen_protos.py).

The servicers, the proto <-> tensor codec and the Ray Serve application land here with the gRPC endpoint issue.
"""
