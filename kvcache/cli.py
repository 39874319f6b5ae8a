"""CLI hooks: ``pdmesh tier-server`` and ``pdmesh cache-server`` (also ``python -m pdmesh.kvcache.cli ...``).

The lead wires :func:`add_parser` into ``pdmesh/cli.py``; each subcommand sets ``func`` returning an exit code.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def _tier_server(args: argparse.Namespace) -> int:
    from pdmesh.kvcache.config import TierConfig, TierConfigError
    from pdmesh.kvcache.server import run_tier_server
    from pdmesh.transfer.segment import SegmentSpaceError

    overrides = {
        "host": args.host,
        "http_port": args.http_port,
        "socket_path": args.socket,
        "pool_bytes": args.pool_bytes,
        "slot_bytes": args.slot_bytes,
        "chunk_tokens": args.chunk_tokens,
        "remote__url": args.remote,
    }
    if args.transfer_port is not None:
        overrides["transfer__enabled"] = True
        overrides["transfer__port"] = args.transfer_port
        overrides["transfer__host"] = args.transfer_host
        overrides["transfer__advertise_host"] = args.advertise_host
    if args.disk:
        overrides["disk__enabled"] = True
        overrides["disk__path"] = args.disk
    try:
        cfg = TierConfig.load(args.config, **overrides)
    except TierConfigError as e:
        print(f"pdmesh tier-server: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run_tier_server(cfg)
    except SegmentSpaceError as e:
        print(f"pdmesh tier-server: {e.strerror}", file=sys.stderr)
        return 2
    return 0


def _cache_server(args: argparse.Namespace) -> int:
    from pdmesh.kvcache.cache_server import run_cache_server
    from pdmesh.kvcache.config import parse_size
    from pdmesh.security import cluster_token_from_env

    try:
        max_bytes = parse_size(args.max_bytes or os.environ.get("PDMESH_CACHE_MAX_BYTES", "1GiB"))
    except ValueError as e:
        print(f"pdmesh cache-server: --max-bytes: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_cache_server(args.host, args.port, max_bytes, cluster_token_from_env())
    return 0


def add_parser(subparsers) -> None:
    """Register ``tier-server`` and ``cache-server`` on an argparse subparsers object."""
    p = subparsers.add_parser("tier-server", help="run a node's KV cache tier server")
    p.add_argument("--config", help="YAML file (TierConfig; PDMESH_TIER_* variables override it)")
    p.add_argument("--host", help="HTTP bind address (default 127.0.0.1)")
    p.add_argument("--http-port", type=int, help="HTTP port (0 = any free port)")
    p.add_argument("--socket", help="unix control socket path")
    p.add_argument("--pool-bytes", help="memory pool size, e.g. 256MiB")
    p.add_argument("--slot-bytes", help="chunk slot size, e.g. 2MiB")
    p.add_argument(
        "--chunk-tokens",
        type=int,
        help="tokens per chunk of the engine's connector (for /lookup by token ids)",
    )
    p.add_argument("--disk", help="enable the disk tier at this directory")
    p.add_argument("--remote", help="remote tier URL: redis://host:port/db or pdmesh://host:port")
    p.add_argument("--transfer-port", type=int, help="enable the PD transfer receiver on this port (0 = any)")
    p.add_argument("--transfer-host", help="transfer receiver bind address (default 127.0.0.1)")
    p.add_argument("--advertise-host", help="host peers use to reach the transfer receiver")
    p.set_defaults(func=_tier_server)

    c = subparsers.add_parser("cache-server", help="run the shared remote KV cache server")
    c.add_argument("--host", default="127.0.0.1")
    c.add_argument("--port", type=int, default=8400)
    c.add_argument("--max-bytes", help="byte bound, e.g. 4GiB (default PDMESH_CACHE_MAX_BYTES or 1GiB)")
    c.set_defaults(func=_cache_server)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pdmesh.kvcache.cli")
    add_parser(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
