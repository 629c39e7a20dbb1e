"""An in-process Grid: the coordinator talks to ClientApp instances in this process, every
message serialized to Flower's wire objects and back (so content that would not survive the
wire fails here too, and byte counts are real). For tests and single-process dry runs; the
simulation engine and SuperLink deployments use Flower's own grids.

`outbox` records every reply a client produced, as wire bytes, for inspection (tests check that
no private content is in any of them). `fail` makes chosen nodes raise, to test failed clients.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping


def wire_bytes(msg: Any) -> bytes:
    """Every object of a message as it would be sent (metadata, records, arrays, chunks)."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return b"".join(obj.deflate() for obj in get_all_nested_objects(msg).values())


def roundtrip(msg: Any) -> Any:
    """The message after deflation and inflation, as the receiving side would see it."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    objects = get_all_nested_objects(msg)
    contents = {oid: obj.deflate() for oid, obj in objects.items()}
    out = inflate_object_from_contents(msg.object_id, contents)
    out.metadata.__dict__.update(msg.metadata.__dict__)  # ids are assigned by the link; keep them
    return out


@dataclass
class LocalGrid:
    client_app: Any
    node_configs: Mapping[int, Mapping[str, Any]]  # node id -> node config (e.g. {"data-dir": ...})
    run_config: Mapping[str, Any]
    intercept: Callable[[int, Any], Any] | None = None  # (node, reply) -> reply (to tamper in tests)
    outbox: list[tuple[int, str, bytes]] = field(default_factory=list)  # (node, message type, wire bytes)
    fail: set[int] = field(default_factory=set)
    run_id: int = 1

    def __post_init__(self) -> None:
        from flwr.app import Context, RecordDict
        from flwr.supercore.task_identity import TaskIdentity

        # Flower stamps messages with the identity of the running task; the runtime normally sets it.
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = self.run_id, 1, 0

        self._contexts = {
            n: Context(run_id=self.run_id, node_id=n, node_config=dict(cfg), state=RecordDict(),
                       run_config=dict(self.run_config))
            for n, cfg in self.node_configs.items()
        }
        self._counter = 0

    def get_node_ids(self) -> list[int]:
        return sorted(self._contexts)

    def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None) -> list[Any]:
        from flwr.app import Error, Message

        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            self._counter += 1
            msg.metadata.__dict__["_message_id"] = f"{self._counter:064x}"
            msg.metadata.__dict__["_src_node_id"] = 0
            received = roundtrip(msg)
            if node in self.fail:
                reply = Message(Error(code=0, reason="node unreachable (simulated)"), reply_to=received)
            else:
                reply = self.client_app(received, self._contexts[node])
            if self.intercept is not None:
                reply = self.intercept(node, reply)
            self.outbox.append((node, msg.metadata.message_type, wire_bytes(reply)))
            replies.append(roundtrip(reply) if not reply.has_error() else reply)
        return replies
