"""A client that runs inside a network namespace (``python -m tests.e2e.netns_client``) for the two-host tests.

``health <url> <timeout_s>``: wait until the router reports ready (exit 0) or not (exit 1).
``tokens <url>``: send the correctness requests (:func:`tests.e2e.oracle.make_requests`) one by one; print the
generated token ids as one JSON list.
"""

from __future__ import annotations

import json
import sys
import time

import httpx

from tests.e2e.oracle import make_requests, token_ids


def main() -> int:
    mode, url = sys.argv[1], sys.argv[2]
    if mode == "health":
        deadline = time.monotonic() + float(sys.argv[3])
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=2, trust_env=False).status_code == 200:
                    return 0
            except httpx.HTTPError:
                pass
            time.sleep(1)
        return 1
    with httpx.Client(timeout=300, trust_env=False) as c:
        print(json.dumps([token_ids(path, body, url, c) for path, body in make_requests()]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
