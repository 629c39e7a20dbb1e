"""The daemon API under load on loopback: concurrent clients mixing add and ask against a real
daemon process (tiny model: the mechanics, not answer quality, are under test). No errors, no
item lost or duplicated, latency percentiles recorded.

Fast suite: 50 clients for OPPU_LOAD_SECONDS (default 60), while the daemon's coordinator is
unreachable the whole time: its SuperNode (a stand-in that only connects, FAKE_SUPERNODE) keeps
failing and is restarted with back-off (0.2 s doubling to 1 s stands in for minutes); afterwards
the coordinator comes up and the node reconnects. Soak (OPPU_SOAK=1): 100 clients for
OPPU_SOAK_SECONDS (default 600) with a training job running in the background throughout.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import sys
import textwrap
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "client"))

from test_daemon_process import QUESTIONS, DaemonProcess, synthetic_items  # noqa: E402
from waiting import wait_for  # noqa: E402

POOL = synthetic_items(400, seed=77)


async def _client(i: int, d: DaemonProcess, until: float, out: dict, rng: random.Random) -> None:
    k = 0
    async with httpx.AsyncClient(base_url=d.url, headers=d.headers(), timeout=120) as http:
        while time.monotonic() < until:
            if rng.random() < 0.6:
                n = rng.randint(1, 5)
                batch = [{**POOL[(k + j) % len(POOL)], "id": f"c{i}-{k + j}"} for j in range(n)]
                k += n
                t0 = time.perf_counter()
                try:
                    r = await http.post("/v1/history", json={"items": batch})
                except httpx.HTTPError as e:
                    out["errors"].append(f"add: {type(e).__name__}")
                    continue
                out["add_s"].append(time.perf_counter() - t0)
                if r.status_code == 200 and r.json()["added"] == n:
                    out["acked"].update(it["id"] for it in batch)
                    out["items"] += n
                else:
                    out["errors"].append(f"add: {r.status_code} {r.text[:200]}")
            else:
                t0 = time.perf_counter()
                try:
                    r = await http.post("/v1/ask", json={"fields": rng.choice(QUESTIONS), "max_new_tokens": 8})
                except httpx.HTTPError as e:
                    out["errors"].append(f"ask: {type(e).__name__}")
                    continue
                out["ask_s"].append(time.perf_counter() - t0)
                if r.status_code != 200:
                    out["errors"].append(f"ask: {r.status_code} {r.text[:200]}")


def run_load(d: DaemonProcess, clients: int, seconds: float) -> dict:
    out = {"add_s": [], "ask_s": [], "acked": set(), "items": 0, "errors": []}
    rng = random.Random(5)

    async def main() -> None:
        until = time.monotonic() + seconds
        await asyncio.gather(*(_client(i, d, until, out, random.Random(rng.random())) for i in range(clients)))

    t0 = time.monotonic()
    asyncio.run(main())
    out["seconds"] = time.monotonic() - t0
    return out


def stored_ids(d: DaemonProcess) -> list[str]:
    ids, offset = [], 0
    while True:
        page = d.ok("get", "/v1/history", params={"offset": offset, "limit": 1000})
        ids += [it["id"] for it in page["items"]]
        offset += len(page["items"])
        if offset >= page["total"] or not page["items"]:
            return ids


def pct(xs: list[float]) -> tuple[float, float, float]:
    if not xs:
        return (float("nan"),) * 3
    p = np.percentile(np.asarray(xs) * 1000, [50, 95, 99])
    return float(p[0]), float(p[1]), float(p[2])


def check_and_record(d: DaemonProcess, res: dict, clients: int, seed_ids: set, figures) -> None:
    ids = stored_ids(d)
    stored = set(ids) - seed_ids
    duplicated = len(ids) - len(set(ids))
    lost = len(res["acked"] - stored)
    unexpected = len(stored - res["acked"])  # stored but never acknowledged (there are no requests in flight)
    figures.load(clients=clients, seconds=res["seconds"], requests=len(res["add_s"]) + len(res["ask_s"]),
                 adds=len(res["add_s"]), items=res["items"], asks=len(res["ask_s"]), errors=len(res["errors"]),
                 acknowledged=len(res["acked"]), stored=len(stored), lost=lost, duplicated=duplicated,
                 add_ms=pct(res["add_s"]), ask_ms=pct(res["ask_s"]))
    assert not res["errors"], res["errors"][:5]
    assert lost == 0 and duplicated == 0 and unexpected == 0, (lost, duplicated, unexpected)
    assert len(res["add_s"]) > clients and len(res["ask_s"]) > clients  # every client did real work


FAKE_SUPERNODE = textwrap.dedent("""
    # Stands in for flower-supernode: connects to --superlink, exits 1 when it cannot (as the
    # real one does after its retries), stays up while connected.
    import socket, sys
    host, port = sys.argv[sys.argv.index("--superlink") + 1].rsplit(":", 1)
    try:
        s = socket.create_connection((host, int(port)), timeout=2)
    except OSError as e:
        print("cannot reach the SuperLink:", e, flush=True)
        sys.exit(1)
    print("connected", flush=True)
    while s.recv(1):
        pass
    sys.exit(1)
""")


def test_api_under_concurrent_clients_while_the_coordinator_is_unreachable(tiny_model_dir, tmp_path, figures):
    seconds = float(os.environ.get("OPPU_LOAD_SECONDS", "60"))
    fake = tmp_path / "fake_supernode.py"
    fake.write_text(FAKE_SUPERNODE)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here until the coordinator comes back
    d = DaemonProcess(tmp_path / "data", tiny_model_dir, coordinator=f"127.0.0.1:{port}", insecure=True,
                      supernode_command=f"{sys.executable} {fake}", backoff_initial=0.2, backoff_max=1.0)
    link = None
    try:
        d.start()
        seed = synthetic_items(20, seed=3)
        d.ok("post", "/v1/history", json={"items": seed})
        d.wait_job(d.ok("post", "/v1/train", json={"epochs": 1})["id"])  # answers use a personal adapter
        res = run_load(d, 50, seconds)
        fed = d.ok("get", "/v1/status")["federation"]
        check_and_record(d, res, 50, {it["id"] for it in seed}, figures)
        assert fed["starts"] >= 5 and fed["consecutive_failures"] >= 5, fed
        assert "exited with code 1" in (fed["last_error"] or ""), fed
        # The coordinator comes back: the next restart connects and stays up.
        link = socket.socket()
        link.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        link.bind(("127.0.0.1", port))
        link.listen(8)
        wait_for(lambda: "connected" in (d.dir / "logs" / "supernode.log").read_text(), 30,
                 "the SuperNode to connect", every=0.2)
        wait_for(lambda: d.ok("get", "/v1/status")["federation"]["state"] == "running", 10,
                 "the federation state 'running'", every=0.2)
        lost = len(res["acked"] - set(stored_ids(d)))
        figures.fault("coordinator unreachable", how=f"no SuperLink for the {res['seconds']:.0f} s of the load test "
                      f"(back-off 0.2 s doubling to 1 s stands in for minutes): {fed['starts']} SuperNode starts while "
                      f"50 clients were served without an error; then the coordinator came up and the node reconnected",
                      survived=lost == 0, acknowledged=len(res["acked"]), lost=lost, adapter_ok=None,
                      note="(a stand-in SuperNode that only connects; the real one: tests/client/test_daemon_federation.py)")
        assert lost == 0
    finally:
        d.stop()
        if link is not None:
            link.close()


@pytest.mark.skipif(os.environ.get("OPPU_SOAK") != "1", reason="long soak: set OPPU_SOAK=1")
def test_soak_with_training_in_the_background(tiny_model_dir, tmp_path, figures):
    seconds = float(os.environ.get("OPPU_SOAK_SECONDS", "600"))
    d = DaemonProcess(tmp_path / "data", tiny_model_dir)
    try:
        d.start()
        seed = synthetic_items(20, seed=3)
        d.ok("post", "/v1/history", json={"items": seed})
        job = d.ok("post", "/v1/train", json={"epochs": 100})
        res = run_load(d, 100, seconds)
        assert d.ok("get", f"/v1/jobs/{job['id']}")["state"] in ("running", "succeeded")
        check_and_record(d, res, 100, {it["id"] for it in seed}, figures)
    finally:
        d.stop()
