"""pdmesh: a prefill/decode disaggregation mesh for LLM serving (docs/architecture.md).

The one installed top-level package. The service folders at the top of the repository are its subpackages
(pyproject's package-dir): ``router/`` is ``pdmesh.router``, and likewise ``connector``, ``prefiller``,
``decoder``, ``kvcache``, ``transfer`` and ``kernels``. Imports only point down:
services (``pdmesh.cli``, ``pdmesh.worker``, ``pdmesh.router``) -> ``pdmesh.connector`` -> roles
(``pdmesh.prefiller``, ``pdmesh.decoder``) -> ``pdmesh.kvcache`` -> ``pdmesh.transfer`` / ``pdmesh.kernels`` ->
the foundation modules below (tests/test_layout.py checks it).

This folder holds the command and what every layer shares:

- ``cli`` (the ``pdmesh`` command), ``status`` (``pdmesh status``), ``planner`` + ``plan_sim`` + ``plan_live`` +
  ``plan_command`` (``pdmesh plan``: pool sizes for a load, checked by a simulation, fed by live metrics),
  ``placement`` (which core each engine of ``pdmesh up`` is pinned to), ``cluster`` (``pdmesh up``: a local cluster), ``modelgen`` (the built-in tiny
  model), ``lora_adapter`` (a PEFT LoRA adapter written for a local model), ``worker/`` (the shared launch of a worker node).
- Foundation, imported by every layer and importing none: ``security`` (the cluster token), ``procs`` (owned
  subprocesses), ``frames`` (the length-prefixed msgpack codec of every binary protocol), ``breaker`` (the one
  circuit breaker), ``failpoints`` (named places where the fault tests make a process die or stall), ``http_guard`` (header timeout and connection cap of every HTTP listener), ``restart_policy``
  (the one restart policy of every supervisor: backoff, crash-loop rule, a dead child's last log lines).
"""

import importlib.abc
import importlib.util
import sys
from pathlib import Path

_SUBPACKAGES = ("router", "connector", "prefiller", "decoder", "kvcache", "transfer", "kernels")
_ROOT = Path(__file__).resolve().parent.parent


class _SourceTreeFinder(importlib.abc.MetaPathFinder):
    """Finds ``pdmesh.<sub>`` in a source checkout, where ``<sub>/`` sits beside ``pdmesh/``.

    Installed only when this package was imported from a checkout (``pyproject.toml`` beside it), first in
    ``sys.meta_path``: the subpackages then always come from the same tree as ``pdmesh`` itself, whether the
    checkout is installed editable, installed elsewhere, or not at all. A wheel has no ``pyproject.toml`` beside
    the package, so installed copies never use it.
    """

    def find_spec(self, fullname, path=None, target=None):
        head, _, sub = fullname.partition(".")
        if head != "pdmesh" or sub not in _SUBPACKAGES:
            return None
        init = _ROOT / sub / "__init__.py"
        if not init.is_file():
            return None
        return importlib.util.spec_from_file_location(
            fullname, init, submodule_search_locations=[str(init.parent)]
        )


if (_ROOT / "pyproject.toml").is_file() and not any(isinstance(f, _SourceTreeFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _SourceTreeFinder())  # subpackages come from the tree this package came from
