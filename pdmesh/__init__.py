"""pdmesh: a prefill/decode disaggregation mesh for LLM serving (docs/architecture.md).

The one installed top-level package. The service folders at the top of the repository are its subpackages
(pyproject's package-dir): ``router/`` is ``pdmesh.router``, and likewise ``connector``, ``prefiller``,
``decoder``, ``kvcache``, ``transfer`` and ``kernels``. Imports only point down:
services (``pdmesh.cli``, ``pdmesh.worker``, ``pdmesh.router``) -> ``pdmesh.connector`` -> roles
(``pdmesh.prefiller``, ``pdmesh.decoder``) -> ``pdmesh.kvcache`` -> ``pdmesh.transfer`` / ``pdmesh.kernels`` ->
the foundation modules below (tests/test_layout.py checks it).

This folder holds the command and what every layer shares:

- ``cli`` (the ``pdmesh`` command), ``cluster`` (``pdmesh up``: a local cluster), ``modelgen`` (the built-in tiny
  model), ``worker/`` (the shared launch of a worker node).
- Foundation, imported by every layer and importing none: ``security`` (the cluster token), ``procs`` (owned
  subprocesses), ``frames`` (the length-prefixed msgpack codec of every binary protocol), ``breaker`` (the one
  circuit breaker).
"""
