"""Flower ClientApp: message glue only; the work is in client/rounds.py.

The same app runs in the simulation engine (virtual users) and under a SuperNode (one user's
data directory, node config `data-dir`). Replies carry only artifact ids, chunk acks, the
base adapter's tensors (when the run federates it) and numbers: see shared/protocol.py.
"""

from __future__ import annotations

import logging

from shared import environment

environment.apply()  # before Flower is imported: its telemetry and update check reach the network

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod

from shared.privacy import clip_update
from shared.protocol import (ARRAYS, CHUNK, COHORT, CONFIG, DATA, METRICS, PARTITIONS, REPLY, ChunkHeader, ClientError,
                             ProtocolError, RoundConfig, cohort_partitions)

from . import cohort, rounds  # module references: the handlers look up rounds.train etc. when called

log = logging.getLogger("oppu.client")

CLIPPING_NORM_KEY = "clipping_norm"  # flwr.supercore.differential_privacy.KEY_CLIPPING_NORM
ERROR_CODE = 2  # flwr ErrorCode.CLIENT_APP_RAISED_EXCEPTION


def contain_errors(msg: Message, context: Context, call_next):  # type: ignore[no-untyped-def]
    """A failure is logged here in full, but only its type (and our own, content-free messages)
    goes back: an exception's text could quote a history item."""
    try:
        return call_next(msg, context)
    except Exception as e:  # noqa: BLE001 - every failure becomes an error reply
        log.exception("%s failed", msg.metadata.message_type)
        reason = f"{type(e).__name__}: {e}" if isinstance(e, ClientError) else (
            f"{type(e).__name__} (details in the client's log)")
        return Message(Error(code=ERROR_CODE, reason=reason), reply_to=msg)


def clip_when_private(msg: Message, context: Context, call_next):  # type: ignore[no-untyped-def]
    """Flower's fixedclipping_mod on DP rounds (the coordinator then sends a clipping norm); it is
    attached to train messages only, since on other messages it would reject the reply."""
    config = msg.content.config_records.get(CONFIG)
    if config is not None and CLIPPING_NORM_KEY in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


def secagg_when_asked(msg: Message, context: Context, call_next):  # type: ignore[no-untyped-def]
    """Flower's secaggplus_mod on the SecAgg+ stages of a round (the coordinator's
    federation.secagg); ordinary train messages pass through untouched."""
    from flwr.client.mod import secaggplus_mod
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


app = ClientApp(mods=[contain_errors])


def _node(context: Context):  # type: ignore[no-untyped-def]
    return rounds.node_from(context.run_config, context.node_config)


@app.query("identify")
def identify(msg: Message, context: Context) -> Message:
    # A simulated user's node id is random per run; its partition id is what the coordinator
    # samples by, so a rerun trains the same users (coordinator/sampling.py). A deployed client
    # (its own data directory) says nothing about itself.
    pid = rounds.partition_of(context.node_config)
    mine = {"partition": pid} if pid is not None else {}
    return Message(RecordDict({REPLY: ConfigRecord(mine)}), reply_to=msg)


@app.query("inventory")
def inventory(msg: Message, context: Context) -> Message:
    return Message(RecordDict({REPLY: ConfigRecord({"held": rounds.inventory(_node(context))})}), reply_to=msg)


def _record(msg: Message, kind: str, key: str):  # type: ignore[no-untyped-def]
    """A record the protocol requires; a clear ProtocolError when the message lacks it."""
    records = {"config": msg.content.config_records, "arrays": msg.content.array_records}[kind]
    if key not in records:
        raise ProtocolError(f"{msg.metadata.message_type} message without its {key!r} {kind} record")
    return records[key]


def _arrays(msg: Message) -> dict:
    import numpy as np

    out = {}
    for k, a in _record(msg, "arrays", ARRAYS).items():
        v = a.numpy()
        if not np.issubdtype(v.dtype, np.floating):
            raise ProtocolError(f"tensor {k[:120]!r} has dtype {v.dtype}, expected floating point")
        out[k] = v
    return out


@app.query("artifact")
def artifact(msg: Message, context: Context) -> Message:
    header = ChunkHeader.from_record(_record(msg, "config", CHUNK))
    payload = _record(msg, "arrays", DATA)
    if set(payload) != {"bytes"} or payload["bytes"].dtype != "uint8" or len(payload["bytes"].shape) != 1:
        raise ProtocolError("artifact chunk data must be one 1-D uint8 array named 'bytes'")
    data = payload["bytes"].numpy().tobytes()
    ack = _node(context).cache.receive(header, data)
    return Message(RecordDict({REPLY: ConfigRecord(ack)}), reply_to=msg)


@app.train(mods=[secagg_when_asked, clip_when_private])
def train(msg: Message, context: Context) -> Message:
    if LEGACY_FITINS in msg.content.config_records:
        return _train_secagg(msg, context)
    cfg = RoundConfig.from_record(_record(msg, "config", CONFIG))
    arrays = _arrays(msg)
    node = _node(context)
    update, metrics = rounds.train(node, cfg, arrays)
    content = RecordDict({METRICS: MetricRecord(rounds.reply_metrics(node, metrics))})
    if update is not None:
        content[ARRAYS] = ArrayRecord({k: Array(update[k]) for k in arrays})  # same keys, same order
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg = RoundConfig.from_record(_record(msg, "config", CONFIG))
    arrays = _arrays(msg)
    node = _node(context)
    metrics = rounds.evaluate(node, cfg, arrays)
    return Message(RecordDict({METRICS: MetricRecord(rounds.reply_metrics(node, metrics))}), reply_to=msg)


@app.query("personalize")
def personalize(msg: Message, context: Context) -> Message:
    """A simulation worker trains a cohort of sampled users' personal adapters in one pass
    (client/cohort.py); the reply names them and carries numbers only."""
    cfg = RoundConfig.from_record(_record(msg, "config", CONFIG))
    partitions = cohort_partitions(_record(msg, "config", COHORT))
    node = _node(context)
    metrics = cohort.personalize_cohort(node, cfg, _arrays(msg), partitions)
    return Message(RecordDict({REPLY: ConfigRecord({PARTITIONS: partitions}),
                               METRICS: MetricRecord(rounds.reply_metrics(node, metrics))}), reply_to=msg)


LEGACY_FITINS = "fitins.config"  # SecAgg+ speaks Flower's legacy FitIns/FitRes records


def _train_secagg(msg: Message, context: Context) -> Message:
    """A train round under SecAgg+: the same work; the update, clipped here when the run is
    private, goes back as a legacy FitRes that secaggplus_mod masks before it leaves."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    keys = str(fitins.config["oppu-keys"]).split(",")
    arrays = dict(zip(keys, parameters_to_ndarrays(fitins.parameters)))
    cfg = RoundConfig.from_record(fitins.config)
    node = _node(context)
    update, metrics = rounds.train(node, cfg, arrays)
    metrics = rounds.reply_metrics(node, metrics)
    if update is None:
        raise ClientError("a SecAgg+ round needs privacy.federate_base_adapter = true")
    if CLIPPING_NORM_KEY in fitins.config:
        update, _ = clip_update(update, arrays, clipping_norm=float(fitins.config[CLIPPING_NORM_KEY]))
    # Every user weighs the same under SecAgg+: the protocol scales each update by weight / max_weight
    # before quantizing it, so unequal weights would cost precision (and under DP they must be equal).
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([update[k] for k in keys]), 1, metrics)
    return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)
