"""gRPC and HTTP serving on Ray Serve.

- ``app``: the ingress deployment behind Serve's gRPC proxy (GenerateService, PlacementService, KServe v2,
  grpc.health.v1) and HTTP proxy (the OpenAI-compatible API of ``openai_api``, requests checked in
  ``openai_protocol``, bodies built in ``openai_responses``), and ``start_serving``; ``lifecycle``: the 'loading'
  stand-in and the drain;
- ``engine_handle``: the ingress's one handle on the engine (routing, abort fan-out, health, placement calls);
- ``codec``: proto <-> engine types; every gRPC response is built there;
- ``errors``: the one exception -> gRPC status / HTTP status table; ``auth``: the admin token and the API key;
  ``admission``: exact admission control and request ids in flight;
- ``wire``: the servicer functions Serve's gRPC proxy registers (undecodable requests answer INVALID_ARGUMENT);
- ``gen``: stubs generated from protos/ by scripts/gen_protos.py (only this package imports them).
"""
