from __future__ import annotations

import httpx
import pytest

from pdmesh.router.app import create_app
from pdmesh.router.config import RouterConfig
from tests.e2e.oracle import scrape
from tests.router.fake_worker import FakeWorker
from tests.servers import ThreadServer

TOKEN = "test-cluster-token"


class RouterHarness:
    """A real router (uvicorn thread) plus fake workers registered through the real registration API."""

    def __init__(self, **cfg) -> None:
        base = {
            "cluster_token": TOKEN,
            "pd_mode": "nixl",
            "policies": {"prefill": "round_robin", "decode": "round_robin"},
        }
        # the unit tests pin what they exercise: round robin, PD for every prompt (the defaults are tested apart)
        base["conditional_pd"] = {
            "min_uncached_tokens": 0,
            "max_prefill_queue_tokens": 0,
            "idle_decoder_max_uncached_tokens": 0,
        }
        self.config = RouterConfig.model_validate({**base, **cfg})
        self.server = ThreadServer(create_app(self.config)).start()
        self.url = self.server.url
        self.client = httpx.Client(base_url=self.url, timeout=10, trust_env=False)
        self.workers: list[tuple[FakeWorker, ThreadServer]] = []

    def add(self, role: str, name: str | None = None, model: str = "m", **extra: object) -> FakeWorker:
        fw = self.start_worker(name or f"{role}-{len(self.workers)}")
        self.register(fw.name, role, fw.url, model, **extra)
        return fw

    def start_worker(self, name: str) -> FakeWorker:
        """A fake worker serving on 127.0.0.1, stopped by :meth:`close`, not registered."""
        fw = FakeWorker(name)
        srv = ThreadServer(fw.app).start()
        self.workers.append((fw, srv))
        fw.url = srv.url  # type: ignore[attr-defined]
        return fw

    def register(
        self, worker_id: str, role: str, url: str, model: str = "m", **extra: object
    ) -> httpx.Response:
        r = self.client.post(
            "/internal/workers",
            json={"worker_id": worker_id, "role": role, "url": url, "models": [model], **extra},
            headers={"X-PDMesh-Token": TOKEN},
        )
        r.raise_for_status()
        return r

    def metric(self, name: str, **labels: str) -> float:
        return scrape(self.client.get("/metrics").text, name, **labels)

    def close(self) -> None:
        self.client.close()
        for _, srv in self.workers:
            srv.stop()
        self.server.stop()


@pytest.fixture
def harness():
    h = RouterHarness()
    yield h
    h.close()


@pytest.fixture
def make_harness():
    made: list[RouterHarness] = []

    def make(**cfg) -> RouterHarness:
        h = RouterHarness(**cfg)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


@pytest.fixture(scope="session")
def tls_cert(tmp_path_factory) -> tuple[str, str]:
    """A self-signed certificate for ``localhost`` (cert path, key path), made with the openssl CLI."""
    import shutil
    import subprocess

    if not shutil.which("openssl"):
        pytest.skip("openssl CLI not found (needed to make a test certificate)")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return str(cert), str(key)
