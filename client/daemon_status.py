"""What `oppu client status` shows: the daemon, its base model and adapters, the history, the
privacy spent, the federation, the jobs, and the problems to fix, read from a running service."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.adapters import FRAMEWORK_VERSION

from .appgate import trust_status
from .host import UNTRAINED
from .personal import version_name
from .settings import AUGMENTATION_METHOD
from .supernode import read_privacy, transport_name
from .userdir import derived_from_history

if TYPE_CHECKING:  # for the annotations only: the service imports this module
    from .service import ClientService


def daemon_status(svc: ClientService) -> dict[str, Any]:
    svc.refresh()
    base = svc.engine.base
    active = svc.jobs.active()
    pub = svc.host.published
    count = svc.count()
    return {
        "daemon": {"pid": os.getpid(), "framework_version": FRAMEWORK_VERSION, "data_dir": str(svc.dir),
                   "uptime_s": round(time.time() - svc.started, 1), "task": svc.task.name,
                   "method": AUGMENTATION_METHOD[svc.spec.augmentation],
                   "item_fields": list(svc.task.item_fields), "label_field": svc.task.label_field,
                   "labels": list(svc.task.labels) if svc.task.labels else None},
        "base_model": {"hash": svc.engine.model_hash, "path": str(base.directory),
                       "quantization": base.quantization, "device": base.device, "dtype": str(base.dtype),
                       "threads": _torch_threads()},
        "base_adapter": svc.base.status(),
        "personal_adapter": {**pub.info(), "path": str(pub.path), "answers": not svc.host.stale,
                             "not_answering_because": svc.host.stale, "retraining": svc.retrain_note}
        if pub else None,
        "personal_versions": [version_name(v) for v in svc.personal.versions()],
        "history": {"count": count, "new_since_training": max(0, count - svc.trained_on()),
                    "retrain_after": svc.spec.retrain_after,
                    "derived_files": derived_from_history(svc.dir)},  # none after forget
        "auto_train": svc.auto_train_status(count),
        "last_training": _last_training(svc),
        "privacy": read_privacy(svc.dir),
        "federation": _federation_status(svc),
        "jobs": {"active": active.public() if active else None,
                 "interrupted_at_start": [j.id for j in svc.jobs.interrupted]},
        "problems": _problems(svc),
    }


def _problems(svc: ClientService) -> list[str]:
    out = list(svc.host.problems)
    if svc.host.base_info["source"] == UNTRAINED and not svc.base.preparing():
        out.append(f"base adapter untrained: {svc.base.untrained_why}")
    if svc.host.stale and svc.retrain_note:
        out.append(svc.retrain_note)
    return out


def _federation_status(svc: ClientService) -> dict[str, Any] | None:
    if svc.supervisor is None:
        return None
    sup = svc.supervisor.status()
    return {"coordinator": svc.spec.coordinator,
            "transport": transport_name(insecure=svc.spec.insecure, auth_private_key=svc.spec.supernode_auth_key),
            **sup, "app_trust": trust_status(svc.trust, Path(sup["log"]))}


def _last_training(svc: ClientService) -> dict[str, Any] | None:
    """The newest finished training's decision, in words (the job's `decision`)."""
    done = next((j for j in svc.jobs.list() if j.kind == "train" and "decision" in j.result), None)
    if done is None:
        return None
    return {"job": done.id, "finished": done.finished, "adopted": done.result.get("adopted"),
            "decision": done.result["decision"]}


def _torch_threads() -> int:
    import torch  # loaded already by the model; not at import, so client/api.py stays light

    return torch.get_num_threads()
