"""pdmesh.router: the OpenAI-compatible router (docs/router.md). Clients reach only this service.

Folder map, in request order:

- ``main`` (run it), ``processes`` + ``peers`` (N router processes on one port: supervisor, relayed
  registrations, merged metrics), ``app`` (ASGI entry: completion routes on raw ASGI, the rest on FastAPI).
- ``exchange`` (one client exchange on raw ASGI: headers, bounded body, disconnect watch), ``auth``, ``limits``
  (admission), ``openai_requests`` (edge validation), ``errors`` (OpenAI-style errors).
- ``flow`` (the request flow: admission, analysis, response), ``state`` (the app's per-process state), ``legs``
  (which legs and in which order: push PD with both legs at once, NIXL PD, decode-only, data-parallel),
  ``ttft_breakdown`` + ``tracing`` (TTFT stages: histogram, optional OTLP spans), ``batch`` (batched prompts: one routed request per
  prompt, merged), ``passthrough`` (``/tokenize``, ``/v1/embeddings``, ``/v1/responses``... to one worker),
  ``policy_set`` (policy instances per model and pool, request ids), ``decode_report`` (what the router reads
  from a worker's answer), ``pd_push`` / ``pd_nixl`` (what the legs carry in
  the two PD protocols), ``upstream`` (legs: retries before the first byte, stream relay), ``leg_client`` +
  ``leg_target`` (keep-alive HTTP/1.1 client of the legs).
- ``registry`` + ``registration`` (the registration schema, a leaf the worker agent imports) + ``discovery`` +
  ``health_checks`` (which workers exist and are healthy; breakers are ``pdmesh.breaker``).
- ``deciders/`` (conditional PD: one module per decider, a name -> factory registry over the typed
  ``conditional_pd`` config; the first yes names the decode-only reason).
- ``policies/`` (worker choice: one module per policy, a name -> factory registry), ``prefix_index``,
  ``prompt_keys``, ``prompt_analysis``, ``tier_lookup``, ``route_context`` (what cache-aware choice reads).
- ``metrics``, ``log_format``, ``config``.
"""
