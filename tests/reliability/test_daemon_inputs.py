"""Bad input at the daemon's doors, with the real service (tiny model) behind them: the local API
fuzzed by schemathesis from its own OpenAPI schema, hostile import archives, and hostile
coordinator messages handed to the real ClientApp. After every refused input the history store,
the personal adapters and the artifact cache are exactly as before."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stored_state
from client.archive import ArchiveError
from client.items import ItemError
from client.jobs import JobBusy
from client.service import ClientService
from client.service_errors import Busy, Conflict
from shared.config import SelectionSpec, TrainSpec
from client.settings import DaemonSpec
from shared.data.synthetic import make_synthetic

TOKEN = "t" * 43


def _user(n: int, seed: int):
    return make_synthetic("synthetic-tag", n_base_users=0, n_eval_users=1, history_size=n, n_queries=2,
                          seed=seed).eval_users[0]


@pytest.fixture(scope="module")
def service(tiny_engine, tmp_path_factory):
    spec = DaemonSpec(task="synthetic-tag", retrain_after=0, keep_versions=2, max_request_mb=1.0,
                      personal_train=TrainSpec(epochs=1, lr=2e-2, batch_size=4), selection=SelectionSpec(enabled=False))
    svc = ClientService(spec, tmp_path_factory.mktemp("svc") / "dir", engine=tiny_engine)
    svc.add(_user(24, seed=5).history)
    job = svc.train()
    assert svc.jobs.wait(job.id, 120).state == "succeeded"
    yield svc
    svc.close()
    tiny_engine.reset_personal()


def state_of(svc: ClientService) -> dict:
    """What is stored (tests/reliability/stored_state.py): every file of the data directory (the
    Chroma store, adapters and CURRENT, federation status and ledgers, job records), the items and
    profile the store answers with, and the adapter version served."""
    return stored_state.service(svc)


# ----------------------------------------------------------------------------------- the API

@pytest.fixture(scope="module")
def api_schema(service):
    import schemathesis

    from client.api import create_app

    app = create_app(service, TOKEN)
    return schemathesis.openapi.from_asgi("/openapi.json", app, headers={"Host": "127.0.0.1"})


API_TALLY = {"tried": 0, "refused": 0, "accepted": 0, "unauthorized_refused": 0, "changed": 0}
# Operations left out of the fuzzing, and why: forget deletes everything by design (tested on its
# own in tests/client), train starts minutes of work per case, import takes a binary archive (fuzzed
# below with hostile archives).
SKIP = {("POST", "/v1/forget"), ("POST", "/v1/train"), ("POST", "/v1/import")}


def test_api_fuzzed_from_its_openapi_schema(api_schema, service, figures):
    from hypothesis import given
    from schemathesis import GenerationMode
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    ops = [r.ok() for r in api_schema.get_all_operations()]
    ops = [op for op in ops if (op.method.upper(), op.path) not in SKIP]
    assert {op.path for op in ops} >= {"/v1/history", "/v1/ask", "/v1/status", "/v1/history/search"}
    auth = {"Authorization": f"Bearer {TOKEN}", "Host": "127.0.0.1"}
    n = int(os.environ.get("OPPU_API_FUZZ_EXAMPLES", "8"))
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        for op in ops:
            # /v1/ask needs exactly one of `input` and `fields` and, with `fields`, the task's
            # question fields: rules the schema does not state, so a schema-valid request may be
            # refused there (with 422 naming the field).
            excluded = [positive_data_acceptance] if op.path == "/v1/ask" else []

            @settings(max_examples=n, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case):
                if isinstance(case.body, dict) and isinstance(case.body.get("max_new_tokens"), int):
                    case.body["max_new_tokens"] = min(case.body["max_new_tokens"], 8)  # length is not the point
                before = state_of(service)
                response = case.call_and_validate(headers=auth, excluded_checks=excluded)
                API_TALLY["tried"] += 1
                assert response.status_code < 500, (case.path, response.status_code, response.text[:500])
                after = state_of(service)
                if response.status_code >= 400:
                    API_TALLY["refused"] += 1
                    assert response.json().get("detail"), response.text[:300]  # says what is wrong
                    API_TALLY["changed"] += after != before
                    assert after == before, (case.path, response.status_code, stored_state.differences(before, after))
                else:
                    API_TALLY["accepted"] += 1
                    # Adding and deleting history items change the items by design (a fuzzed id
                    # hardly ever names a stored item; DELETE of one that does not exist is a 404).
                    if (case.method.upper(), case.path) not in {("POST", "/v1/history"),
                                                                 ("DELETE", "/v1/history/{item_id}")}:
                        assert after["items"] == before["items"] and after["published"] == before["published"]
                # The same request without the token, or with a wrong one: 401, nothing changes.
                for bad in ({}, {"Authorization": "Bearer " + TOKEN[:-1] + "u"}):
                    headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
                    case.headers = headers
                    r = case.call(headers={"Host": "127.0.0.1", **bad})
                    assert r.status_code == 401, (case.path, r.status_code)  # before the body is even read
                    API_TALLY["unauthorized_refused"] += r.status_code == 401
                assert state_of(service) == after

            run()
    figures.bad_inputs("daemon API (schemathesis from `/openapi.json`)", tried=API_TALLY["tried"],
                       refused=API_TALLY["refused"], accepted_valid=API_TALLY["accepted"], changed=API_TALLY["changed"],
                       how=f"{len(ops)} operations x {n} positive + {n} negative generated requests (forget, train "
                       "and import left out: see the test); checks: no 5xx, response schemas, status codes, "
                       "schema-valid accepted / invalid refused; each request repeated without and with a wrong token; "
                       "snapshot: the data directory, store items and adapters")
    figures.access("every /v1 request fuzzed above, repeated without a token and with a wrong one",
                   f"{API_TALLY['unauthorized_refused']} refused with 401, none changed anything")


# ----------------------------------------------------------------------------------- archives


def _rewrite(src: Path, dest: Path, edit) -> None:
    """Copy an export archive, letting `edit(members: dict[name, bytes])` change members; the
    manifest's hashes are recomputed unless the edit set them itself."""
    with tarfile.open(src) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    manifest = json.loads(members.pop("oppu-export.json"))
    keep_hashes = edit(members, manifest)
    if not keep_hashes:
        manifest["files"] = {k: hashlib.sha256(v).hexdigest() for k, v in members.items()}
    with tarfile.open(dest, "w:gz") as tar:
        for name, data in [("oppu-export.json", json.dumps(manifest).encode()), *members.items()]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _adapter_edit(fn):
    def edit(members, manifest):
        from safetensors.numpy import load as st_load
        from safetensors.numpy import save as st_save

        w = st_load(members["personal/adapter_model.safetensors"])
        out = fn(w)
        members["personal/adapter_model.safetensors"] = out if isinstance(out, bytes) else st_save(out)
        inner = json.loads(members["personal/oppu_adapter.json"])
        inner["files"]["adapter_model.safetensors"] = hashlib.sha256(members["personal/adapter_model.safetensors"]).hexdigest()
        members["personal/oppu_adapter.json"] = json.dumps(inner).encode()
    return edit


def _poison(w):
    k = sorted(w)[0]
    w[k] = w[k].copy()
    w[k].flat[0] = np.nan
    return w


def _reshape(w):
    k = sorted(w)[0]
    w[k] = np.zeros((3, 3), w[k].dtype)
    return w


def _rename(w):
    k = sorted(w)[0]
    w["base_model.model.evil.lora_A.weight"] = w.pop(k)
    return w


def _manifest_field(key, value):
    def edit(members, manifest):
        manifest[key] = value
    return edit


def _inner_manifest(key, value):
    def edit(members, manifest):
        inner = json.loads(members["personal/oppu_adapter.json"])
        inner[key] = value
        members["personal/oppu_adapter.json"] = json.dumps(inner).encode()
    return edit


def _history(lines):
    def edit(members, manifest):
        members["history.jsonl"] = b"".join(json.dumps(x).encode() + b"\n" for x in lines)
        manifest["history_items"] = len(lines)
    return edit


def _add_member(name, data):
    def edit(members, manifest):
        members[name] = data
    return edit


HOSTILE = {
    "adapter weights are not safetensors (hashes match)": _adapter_edit(lambda w: b"\x80\x04K\x01." * 10),
    "adapter weights hold NaN": _adapter_edit(_poison),
    "adapter tensor of the wrong shape": _adapter_edit(_reshape),
    "adapter tensor for a module the model lacks": _adapter_edit(_rename),
    "adapter for another base model": _inner_manifest("base_model_hash", "0" * 64),
    "adapter for another task": _inner_manifest("task", "amazon-rating"),
    "a base adapter passed off as personal": _inner_manifest("role", "base"),
    "pickle member beside the adapter": _add_member("personal/adapter_model.bin", b"\x80\x04K\x01."),
    "archive of another task": _manifest_field("task", "amazon-rating"),
    "newer format version": _manifest_field("format_version", 2),
    "history item with a label the task lacks": _history([{"id": "n1", "fields": {"description": "a", "tag": "nope"}}]),
    "history item re-using an id with other content": None,  # filled in by the test (needs a stored id)
    "history line that is not an object": _history([[1, 2]]),
    "history item with an unknown key": _history([{"id": "n2", "fields": {"description": "a", "tag": "comedy"},
                                                   "x": 1}]),
    "profile that is not text": _add_member("profile.json", b'{"profile": 5}'),
}


def test_hostile_import_archives_change_nothing(service, tmp_path, figures):
    good = tmp_path / "good.tar.gz"
    service.export(good)
    stored = service.store.items()[0]
    HOSTILE["history item re-using an id with other content"] = _history(
        [{"id": stored.id, "fields": {**stored.fields, "description": stored.fields["description"] + " (changed)"},
          "time": stored.time}])
    refused = changed = 0
    for name, edit in HOSTILE.items():
        path = tmp_path / "bad.tar.gz"
        _rewrite(good, path, edit)
        before = state_of(service)
        with pytest.raises((ArchiveError, ItemError, Conflict)) as e:
            service.import_archive(path)
        assert str(e.value), name
        after = state_of(service)
        changed += after != before
        assert after == before, (name, stored_state.differences(before, after))
        assert not list((service.dir / "tmp").glob("import-*")), name  # nothing left half unpacked
        refused += 1
    # The untouched export imports cleanly (nothing new: the same ids and adapter are already held).
    res = service.import_archive(good)
    assert res["history_added"] == 0 and res["personal_version"] is not None
    service.host.roll_back(res["personal_version"] - 1)
    figures.bad_inputs("import of a real export, altered (`POST /v1/import`, ClientService)", tried=len(HOSTILE),
                       refused=refused, changed=changed,
                       how="; ".join(HOSTILE) + "; snapshot: the data directory, store items and adapters")


# ----------------------------------------------------------------------------------- coordinator messages


@pytest.fixture(scope="module")
def client_node(service, tiny_model_dir, tmp_path_factory):
    """The real ClientApp over the service's data directory, its artifact cache holding the model."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import inprocess_federation as fedkit

    from client.artifacts import ArtifactCache
    from client.client_app import app
    from coordinator.distribution import Artifact, iter_chunks
    from localgrid import LocalGrid
    from shared.config import to_run_config
    from shared.protocol import KIND_MODEL

    run = tmp_path_factory.mktemp("fedrun")
    cache = ArtifactCache(run / "cache")
    model = Artifact.from_dir(tiny_model_dir, KIND_MODEL)
    for header, data in iter_chunks(model, 4 << 20):
        cache.receive(header, data)
    assert cache.has(model.id)
    (service.dir / "daemon.toml").write_text('task = "synthetic-tag"\n')
    spec = fedkit.tiny_spec(tiny_model_dir, run, 'methods=["OPPU"]')
    grid = LocalGrid(app, {7: {"data-dir": str(service.dir), "cache-dir": str(cache.root)}}, to_run_config(spec))
    return grid, cache, model


def _send(grid, message_type: str, content) -> object:
    from flwr.app import Message

    msg = Message(content, dst_node_id=7, message_type=message_type)
    return grid.send_and_receive([msg])[0]


def _partials(cache) -> tuple[str, ...]:
    """Transfers in progress (a refused chunk may discard one, by design): not stored state."""
    return tuple(p.name for p in cache.root.glob(".partial-*"))


def test_hostile_coordinator_messages_get_clear_errors_and_change_nothing(service, client_node, figures):
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

    from shared.protocol import KIND_BASE_ADAPTER, ArtifactManifest, RoundConfig

    grid, cache, model = client_node
    base = {k: v.detach().float().cpu().numpy() for k, v in service.engine.base_state().items()}
    k0 = sorted(base)[0]
    good_cfg = RoundConfig(server_round=1, task="synthetic-tag", model=model.id, base_adapter="b" * 64,
                           methods="OPPU").to_record()

    def train_msg(cfg=None, arrays=None, drop=None):
        rec = RecordDict({"config": ConfigRecord(cfg if cfg is not None else good_cfg),
                          "arrays": ArrayRecord({k: Array(v) for k, v in (arrays if arrays is not None else base).items()})})
        if drop:
            del rec[drop]
        return rec

    payload = b'{"a": 1}'
    h = hashlib.sha256(payload).hexdigest()
    from shared.model_manifest import model_hash

    art = ArtifactManifest(model_hash({"config.json": h}), KIND_BASE_ADAPTER, {"config.json": h}, {"config.json": len(payload)})

    def chunk(data: bytes, manifest: str | None = None, header_extra=None, dtype=np.uint8):
        header = {"manifest": manifest or art.to_json(), "files": ["config.json"], "offsets": [0],
                  "lengths": [len(data)], **(header_extra or {})}
        return RecordDict({"chunk": ConfigRecord(header),
                           "data": ArrayRecord({"bytes": Array(np.frombuffer(data, np.uint8).astype(dtype))})})

    pickled = {"model.bin": h}
    cases = {
        "train: round config with NaN epsilon": ("train", train_msg({**good_cfg, "oppu-epsilon": float("nan")})),
        "train: unknown oppu- key": ("train", train_msg({**good_cfg, "oppu-teleport": 1})),
        "train: federate given as text": ("train", train_msg({**good_cfg, "oppu-federate": "false"})),
        "train: unknown method": ("train", train_msg({**good_cfg, "oppu-methods": "OPPU,mind-reading"})),
        "train: model not in the cache": ("train", train_msg({**good_cfg, "oppu-model": "c" * 64})),
        "train: no config record": ("train", train_msg(drop="config")),
        "train: no arrays record": ("train", train_msg(drop="arrays")),
        "train: tensor of the wrong shape": ("train", train_msg(arrays={**base, k0: np.zeros((3, 3), np.float32)})),
        "train: tensor holding NaN": ("train", train_msg(arrays={**base, k0: np.full_like(base[k0], np.nan)})),
        "train: integer tensor": ("train", train_msg(arrays={**base, k0: base[k0].astype(np.int32)})),
        "train: unknown tensor": ("train", train_msg(arrays={**base, "x.lora_B.weight": np.zeros(2, np.float32)})),
        "evaluate: tensor holding inf": ("evaluate", train_msg(arrays={**base, k0: np.full_like(base[k0], np.inf)})),
        "artifact: bytes whose sha256 differs from the manifest": ("query.artifact", chunk(b'{"a": 2}')),
        "artifact: more bytes than the header says": ("query.artifact", chunk(payload + b"xx")),
        "artifact: manifest whose id is not its hash": ("query.artifact", chunk(
            payload, json.dumps({**json.loads(art.to_json()), "id": "d" * 64}))),
        "artifact: pickle file in the manifest": ("query.artifact", chunk(payload, json.dumps(
            {"id": model_hash(pickled), "kind": KIND_BASE_ADAPTER, "files": pickled, "sizes": {"model.bin": 8}}))),
        "artifact: unknown header key": ("query.artifact", chunk(payload, header_extra={"colour": "red"})),
        "artifact: data not uint8": ("query.artifact", chunk(payload, dtype=np.float32)),
    }
    def stored() -> dict:
        return {**state_of(service), "cache": stored_state.files(cache.root, skip_dirs=_partials(cache))}

    measured = stored_state.Measured()
    for name, (mtype, content) in cases.items():
        before = stored()
        reply = _send(grid, mtype, content)
        assert reply.has_error(), name
        reason = reply.error.reason
        assert "details in the client's log" not in reason, (name, reason)  # a clear, specific error
        changed = measured.refused_input(before, stored())
        assert not changed, (name, changed)
    assert all(np.array_equal(v.detach().float().cpu().numpy(), base[k]) for k, v in service.engine.base_state().items())
    figures.bad_inputs("messages a client receives from a coordinator (real ClientApp, LocalGrid wire round trip)",
                       tried=measured.tried, refused=measured.refused, changed=measured.changed,
                       how="; ".join(cases) + "; snapshot: the data directory, store items, adapters and the "
                       "artifact cache's complete artifacts")


# Values a ConfigRecord can carry (what can come off the wire at all), the bad ones included.
CONFIG_VALUE = st.one_of(st.booleans(), st.integers(-2**63, 2**63 - 1), st.floats(), st.text(max_size=20),
                         st.sampled_from(["OPPU,RAG", "OPPU,teleport", "0" * 64, "synthetic-tag", "amazon-rating"]))
ROUND_KEYS = ["oppu-server_round", "oppu-task", "oppu-model", "oppu-base_adapter", "oppu-federate", "oppu-ffa_lora",
              "oppu-proximal_mu", "oppu-methods", "oppu-epsilon", "oppu-delta", "oppu-colour", "server-round",
              "proximal-mu", "clipping_norm"]


def test_round_configs_through_the_real_client_app(service, client_node, figures):
    """Round configs mutated by hypothesis, each sent as a train message to the real ClientApp over
    the service's data directory. Every config names a model the client does not hold, so none
    trains: each must be refused with a specific error (a malformed config by the parser, a
    well-formed one because the model is missing) and change nothing stored (snapshots of the
    data directory, store, adapters and artifact cache before and after each)."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

    from shared.protocol import RoundConfig

    grid, cache, _ = client_node
    base = {k: Array(v.detach().float().cpu().numpy()) for k, v in service.engine.base_state().items()}
    good = RoundConfig(server_round=2, task="synthetic-tag", model="c" * 64, base_adapter="b" * 64, federate=True,
                       methods="OPPU,RAG", epsilon=1.5, delta=1e-5).to_record()
    measured = stored_state.Measured()
    reasons: dict[str, int] = {}

    def stored() -> dict:
        return {**state_of(service), "cache": stored_state.files(cache.root, skip_dirs=_partials(cache))}

    @settings(max_examples=int(os.environ.get("OPPU_FUZZ_EXAMPLES", "30")), deadline=None, derandomize=True,
              database=None, suppress_health_check=list(HealthCheck))
    @given(changes=st.dictionaries(st.sampled_from(ROUND_KEYS), CONFIG_VALUE, max_size=3))
    def run(changes):
        before = stored()
        reply = _send(grid, "train", RecordDict({"config": ConfigRecord({**good, **changes}),
                                                 "arrays": ArrayRecord(dict(base))}))
        assert reply.has_error(), changes
        reason = reply.error.reason
        assert "details in the client's log" not in reason, (changes, reason)
        kind = "round config" if "round config" in reason else "model" if "not in the client cache" in reason else reason
        reasons[kind] = reasons.get(kind, 0) + 1
        changed = measured.refused_input(before, stored())
        assert not changed, (changes, changed)

    run()
    assert set(reasons) <= {"round config", "model"}, reasons  # refused for what is wrong, nothing else
    figures.bad_inputs("round config in train messages (real ClientApp, LocalGrid wire round trip)",
                       tried=measured.tried, refused=measured.refused, changed=measured.changed,
                       how=f"hypothesis: up to 3 keys of a real round config replaced by any value a ConfigRecord "
                       f"carries (unknown keys, wrong types, NaN/inf, unknown methods); every config names a model "
                       f"the client does not hold ({reasons.get('round config', 0)} refused by the parser, "
                       f"{reasons.get('model', 0)} for the missing model); snapshot: the data directory, store "
                       f"items, adapters and the artifact cache's complete artifacts")
