"""The Chroma backend in client/server mode, against a real `chroma run` on a free loopback port."""

import contextlib
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from haina.core.errors import HainaError
from haina.rag import HNSW, open_store

pytest.importorskip("chromadb")
httpx = pytest.importorskip("httpx")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chroma_binary() -> str:
    beside = Path(sys.executable).parent / "chroma"  # the venv's, even when the venv is not activated
    found = str(beside) if beside.exists() else shutil.which("chroma")
    if not found:
        pytest.skip("the `chroma` command is not installed")
    return found


@contextlib.contextmanager
def chroma_server(path: Path):
    """`chroma run` on a free port, until it answers its heartbeat; stopped on exit whatever happened."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(path.parent / f"chroma-{port}.log", "wb")  # noqa: SIM115 (closed in the finally below)
    proc = subprocess.Popen([chroma_binary(), "run", "--path", str(path), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"chroma run exited with {proc.returncode}: "
                            f"{(path.parent / f'chroma-{port}.log').read_text(errors='replace')[-2000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/api/v2/heartbeat", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail("chroma run did not answer its heartbeat within 30 s")
            time.sleep(0.1)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def test_the_contract_through_a_server(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 8)).astype(np.float32)
    ids = [f"doc{i}" for i in range(50)]
    with chroma_server(tmp_path / "db") as (url, _):
        with open_store("chroma", server=url) as store:
            info = store.create_collection("kbase", dim=8, metric="l2", hnsw=HNSW(m=24, ef_construction=200, ef_search=200),
                                           metadata={"embedder": "tiny"})
            assert (info.metric, info.hnsw.m, info.metadata) == ("l2", 24, {"embedder": "tiny"})
            store.upsert("kbase", ids, x, [f"text {i}" for i in range(50)], [{"i": i, "even": i % 2 == 0} for i in range(50)])
            store.upsert("kbase", ids[:5], x[:5], metadatas=[{"i": -1}] * 5)  # replaces: 'even' is gone from these
            assert store.count("kbase") == 50 and store.get("kbase", ["doc0"])[0].metadata == {"i": -1}
            store.update("kbase", ["doc7"], texts=["seven"])
            assert store.get("kbase", ["doc7"])[0].text == "seven"
            assert store.delete("kbase", where={"i": {"$lt": 0}}) == 5
            hits = store.query("kbase", x[10], top_k=3, where={"even": True})[0]
            assert hits[0].id == "doc10" and hits[0].score == pytest.approx(0.0, abs=1e-4)
            assert all(h.metadata["even"] for h in hits)
            with pytest.raises(HainaError, match="filter field 'odd' is not a metadata field"):
                store.query("kbase", x[0], where={"odd": True})
            with pytest.raises(HainaError, match="dimension 4 for collection 'kbase' of dimension 8"):
                store.query("kbase", x[0, :4])
            st = store.stats("kbase")
            assert st["count"] == 45 and st["disk_bytes"] is None and st["fields"] == ["even", "i"]
        # A second client (another process, in real life) sees the same collection.
        with open_store("chroma", server=url) as again:
            assert [c.name for c in again.list_collections()] == ["kbase"]
            assert again.get("kbase", ["doc7"])[0].text == "seven"
            again.drop_collection("kbase")
            assert again.list_collections() == []


def test_a_server_that_is_down_is_one_line(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(HainaError, match=rf"no Chroma server at {url}: start one with `chroma run --path DIR") as e:
        open_store("chroma", server=url)
    assert "\n" not in str(e.value)
    with chroma_server(tmp_path / "db") as (url, proc):
        store = open_store("chroma", server=url)
        store.create_collection("kbase", dim=2)
        proc.terminate()
        proc.wait(timeout=10)
        with pytest.raises(HainaError, match=f"no Chroma server at {url}"):
            store.upsert("kbase", ["a"], np.ones((1, 2)))
        store.close()
    with pytest.raises(HainaError, match="bad Chroma server URL"):
        open_store("chroma", server="127.0.0.1:8000")
