"""What each `oppu client` command does: the daemon itself, and thin commands over its local API.

client/cli.py builds the parser and imports this module only when a command runs; the daemon's
HTTP client is client/daemon_client.py, the reading of item files client/input_files.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import quote

from tqdm.auto import tqdm

from shared.fileio import atomic_file

from . import daemon
from .daemon_client import Api, ApiError
from .input_files import read_items


def cmd_daemon(args: argparse.Namespace) -> int:
    ov = list(args.set or [])
    for key, value in (("coordinator", args.coordinator), ("port", args.port), ("task", args.task),
                       ("base_model.path", args.model), ("base_model.quantization", args.quantization),
                       ("base_model.threads", args.threads), ("base_model.device", args.device)):
        if value is not None:
            ov.append(f"{key}={json.dumps(value)}")
    if args.insecure:
        ov.append("insecure=true")
    data_dir = daemon.resolve_data_dir(args.data_dir)
    spec = daemon.resolve_spec(data_dir, args.config, ov)
    try:
        return daemon.run(data_dir, spec, verbose=args.verbose)
    except daemon.DaemonLocked as e:
        print(f"oppu: error: {e}", file=sys.stderr)
        return 3


def _with_api(fn: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(Api(args), args)
        except ApiError as e:
            print(f"oppu: error: {e}", file=sys.stderr)
            return 2

    return run


@_with_api
def cmd_add(api: Api, args: argparse.Namespace) -> int:
    items = read_items(args.file)
    if not items:
        raise ApiError(f"{args.file} holds no items; nothing was stored")
    added = skipped = 0
    with tqdm(total=len(items), unit="item", desc="adding", disable=len(items) <= args.batch) as bar:
        for start in range(0, len(items), max(1, args.batch)):
            chunk = items[start:start + args.batch]
            try:
                res = api.call("POST", "/v1/history", json={"items": chunk})
            except ApiError as e:
                raise ApiError(_batch_refused(e, args.file, start, len(chunk), len(items), added, skipped)) from None
            added += res["added"]
            skipped += res["skipped"]
            bar.update(len(chunk))
    print(f"added {added}, already present {skipped}; history now holds {res['history_count']} items"
          + (f"; automatic retraining started ({res['auto_train_job']})" if res.get("auto_train_job") else ""))
    return 0


def _batch_refused(e: ApiError, path: str, start: int, size: int, total: int, added: int, skipped: int) -> str:
    """Exactly what was stored when the batch of items start..start+size-1 failed. The daemon
    refuses a batch whole (4xx) before writing any of it; an error inside its write (5xx, a full
    disk) may leave part of it, which sending the same file again completes (ids are idempotent)."""
    batch = f"items {start}-{start + size - 1} of {path}" if size > 1 else f"item {start} of {path}"
    where = f" (the daemon counts items from the batch's first, item {start})" if start else ""
    sent = f"items 0-{start - 1}" if start > 1 else "item 0"
    before = f"{sent} {'were' if start > 1 else 'was'} stored before it ({added} new, {skipped} already present)"
    after = "; nothing after it was sent" if start + size < total else ""
    if 400 <= e.status < 500:
        stored = (f"nothing of {batch} was stored (a refused batch is refused whole); {before}" if start else
                  f"nothing was stored: the batch of {batch} was refused whole")
        return f"{e}{where}\n{stored}{after}. Fix it and run the same command again (items already stored are skipped)"
    return (f"{e}\nwhile sending {batch}" + (f"; {before}" if start else "") + f"{after}. "
            "Run the same command again when fixed (items already stored are skipped)")


@_with_api
def cmd_delete(api: Api, args: argparse.Namespace) -> int:
    res = api.call("DELETE", "/v1/history/" + quote(args.id, safe=""))
    print(f"deleted {res['deleted']!r}; history now holds {res['history_count']} items"
          + ("; the PAG profile was removed with it (made again when needed)" if res["profile_removed"] else ""))
    if res["personal_version"]:
        print(f"personal adapter v{res['personal_version']} was trained before the deletion and keeps what it "
              "learned; `oppu client train` trains one without the item", file=sys.stderr)
    return 0


@_with_api
def cmd_search(api: Api, args: argparse.Namespace) -> int:
    res = api.call("GET", "/v1/history/search", params={"q": args.query, "k": args.k})
    for it in res["items"]:
        print(json.dumps(it, ensure_ascii=False))
    return 0


@_with_api
def cmd_ask(api: Api, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"personal": not args.no_personal}
    if args.field:
        body["fields"] = dict(f.split("=", 1) if "=" in f else (f, "") for f in args.field)
    elif args.text:
        body["input"] = args.text
    else:
        raise ApiError("give the question as TEXT or the item as --field NAME=VALUE")
    try:
        res = api.call("POST", "/v1/ask", json=body)
    except ApiError as e:
        if e.status != 503 or not e.job:
            raise
        # First start: the base adapter is being trained. Show that job, then ask.
        print(f"waiting for the base adapter: {e}", file=sys.stderr)
        job = _watch(api, e.job)
        if job["state"] != "succeeded":
            raise ApiError(f"preparing the base adapter {job['state']}" + (f": {job['error']}" if job.get("error") else ""))
        res = api.call("POST", "/v1/ask", json=body)
    if args.json:
        print(json.dumps(res, indent=2, ensure_ascii=False))
    else:
        version = f"personal v{res['personal_version']}" if res["personal_version"] else "no personal adapter"
        print(res["prediction"] if res["prediction"] is not None else f"(no prediction) {res['answer']}")
        print(f"({res['method']}, {version}, base adapter {res['base_adapter_version']} "
              f"({res['base_adapter_source']}), {res['seconds']:.2f}s)", file=sys.stderr)
        for warning in res.get("warnings", []):
            print(f"warning: {warning}", file=sys.stderr)
    return 0


_UNCOUNTED = "{desc} [{elapsed}]"  # before the first step: no step count to show ("0step")


def _watch(api: Api, job: dict[str, Any]) -> dict[str, Any]:
    """A progress bar from the job's first second: what it is doing (its phase) and the time
    elapsed until the first step is done, then steps done / total with the loss."""
    bar = tqdm(total=None, unit="step", desc=_job_line(job), bar_format=_UNCOUNTED)
    try:
        while job["state"] in ("queued", "running"):
            time.sleep(0.5)
            job = api.call("GET", f"/v1/jobs/{job['id']}")
            if job["steps_total"] and bar.total != job["steps_total"]:
                bar.total, bar.bar_format = job["steps_total"], None
            bar.n = job["steps_done"]
            bar.set_description_str(_job_line(job), refresh=False)
            if job["loss"] is not None:
                bar.set_postfix(loss=f"{job['loss']:.3f}", refresh=False)
            bar.refresh()
    except KeyboardInterrupt:
        bar.close()
        print("cancelling ...", file=sys.stderr)
        job = _cancel(api, job["id"])
    bar.close()
    return job


def _job_line(job: dict[str, Any]) -> str:
    phase = job.get("phase") or job["state"]
    return f"{job['id']}: {phase}"


def _cancel(api: Api, job_id: str) -> dict[str, Any]:
    """Cancel and wait until the job has stopped (between two steps)."""
    job = api.call("POST", f"/v1/jobs/{job_id}/cancel")
    while job["state"] in ("queued", "running"):
        time.sleep(0.5)
        job = api.call("GET", f"/v1/jobs/{job_id}")
    return job


@_with_api
def cmd_train(api: Api, args: argparse.Namespace) -> int:
    body = {k: v for k, v in (("epochs", args.epochs), ("lr", args.lr)) if v is not None}
    job = api.call("POST", "/v1/train", json=body)
    if args.detach:
        print(job["id"])
        return 0
    job = _watch(api, job)
    if job["state"] == "succeeded":
        r = job["result"]
        loss = f"loss {r['final_loss']:.3f}, " if r.get("final_loss") is not None else ""
        done = f"{r['examples']} examples, {r['steps']} steps, {loss}{r['seconds']:.1f}s"
        if r.get("version") is not None:
            print(f"personal adapter v{r['version']} published: {done}")
        else:
            print(f"no new personal adapter ({done})")
        print(r.get("decision") or r.get("selection", ""))  # why it was or was not adopted, on which numbers
        return 0
    print(f"job {job['id']} {job['state']}" + (f": {job['error']}" if job.get("error") else ""), file=sys.stderr)
    return 1


@_with_api
def cmd_jobs(api: Api, args: argparse.Namespace) -> int:
    for j in api.call("GET", "/v1/jobs"):
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(j["created"]))
        print(f"{j['id']}  {j['state']:11s} {j['steps_done']}/{j['steps_total']}  {when}  {j.get('error') or ''}")
    return 0


@_with_api
def cmd_cancel(api: Api, args: argparse.Namespace) -> int:
    j = api.call("GET", "/v1/jobs/" + quote(args.job, safe=""))
    if j["state"] not in ("queued", "running"):
        print(f"{j['id']}: already {j['state']}; nothing to cancel")
        return 1
    j = _cancel(api, j["id"])
    print(f"{j['id']}: {j['state']}" + ("" if j["state"] == "cancelled" else " (it finished before it could stop)"))
    return 0 if j["state"] == "cancelled" else 1


BASE_SOURCES = {"base_adapter_dir": "named by base_adapter_dir", "coordinator": "from the coordinator",
                "builtin": "built-in, cached for this task", "untrained": "UNTRAINED"}


@_with_api
def cmd_status(api: Api, args: argparse.Namespace) -> int:
    s = api.call("GET", "/v1/status")
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    p, b, h, priv = s["personal_adapter"], s["base_adapter"], s["history"], s["privacy"]
    lines = [
        f"task            {s['daemon']['task']} ({s['daemon']['method']}), data dir {s['daemon']['data_dir']}",
        f"base model      {s['base_model']['hash'][:12]} ({s['base_model']['quantization']}, "
        f"{s['base_model']['device']}, {s['base_model']['threads']} threads)",
        f"base adapter    {b['version']} ({BASE_SOURCES.get(b.get('source'), b.get('source'))})"
        + (f"; being prepared: job {b['preparing_job']}" if b.get("preparing_job") else ""),
        "personal        " + (f"v{p['version']}, trained {time.strftime('%Y-%m-%d %H:%M', time.localtime(p['trained_at']))}"
                              f" on {p['data'].get('history_items')} items"
                              + ("" if p.get("answers", True) else ", NOT ANSWERING (trained on another base adapter)")
                              if p else "none yet (oppu client train)"),
        f"history         {h['count']} items, {h['new_since_training']} new since training",
        # .get: a daemon of an earlier version sends no auto_train section.
        f"auto-training   {(s.get('auto_train') or {}).get('message', 'not reported by this daemon')}",
        "last training   " + (s["last_training"]["decision"] if s.get("last_training") else "none yet"),
        f"privacy spent   {priv['rounds']} federated rounds"
        + (f", epsilon {priv['epsilon']:.3g} at delta {priv['delta']:.1g}" if priv.get("epsilon") is not None else ""),
    ]
    if s["federation"]:
        f = s["federation"]
        transport = {"insecure": "INSECURE (unencrypted, opted in)", "tls": "TLS",
                     "tls+node-auth": "TLS, node authentication"}.get(f.get("transport"), f.get("transport"))
        lines.append(f"federation      {f['coordinator']} over {transport}: {f['state']}"
                     + (f" ({f['last_error']})" if f["last_error"] else ""))
        t = f.get("app_trust") or {}
        trusted = []
        if t.get("trusted_app_hashes"):
            trusted.append(f"{len(t['trusted_app_hashes'])} pinned hash(es)")
        if t.get("trusted_entities"):
            trusted.append(f"signed by a key in {t['trusted_entities']}")
        lines.append("app bundles     " + (" and ".join(trusted) if trusted else
                                           "none trusted (refused bundles name the hash to pin)"))
        for message in t.get("messages", []):
            lines.append(f"refused         {message}")
    if s["jobs"]["active"]:
        j = s["jobs"]["active"]
        lines.append(f"training        {j['id']} {j['steps_done']}/{j['steps_total']}"
                     + (f" ({j['phase']})" if j.get("phase") else ""))
    for problem in s.get("problems", []):
        lines.append(f"problem         {problem}")
    print("\n".join(lines))
    return 0


@_with_api
def cmd_export(api: Api, args: argparse.Namespace) -> int:
    dest = Path(args.dest)
    with api.client.stream("GET", "/v1/export") as r:
        if r.status_code >= 400:
            r.read()
            Api._check(r)
        with atomic_file(dest, mode=0o600) as out:  # whole or absent, durable; private history
            for chunk in r.iter_bytes():
                out.write(chunk)
        n = r.headers.get("x-oppu-history-items", "?")
    print(f"exported {n} history items and the personal adapter to {dest}")
    return 0


def _chunks(path: Path) -> Iterable[bytes]:
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            yield block


@_with_api
def cmd_import(api: Api, args: argparse.Namespace) -> int:
    src = Path(args.src)
    res = api.call("POST", "/v1/import", content=_chunks(src),
                   headers={"Content-Type": "application/gzip", "Content-Length": str(src.stat().st_size)})
    v = res["personal_version"]
    print(f"imported {res['history_added']} new history items ({res['history_skipped']} already present)"
          + (f"; personal adapter is now v{v}" if v else ""))
    return 0


@_with_api
def cmd_forget(api: Api, args: argparse.Namespace) -> int:
    if not args.yes:
        refusal = ("nothing deleted: forget asks for confirmation on a terminal, and there is none here (stdin is "
                   "not a terminal); to delete without asking, run `oppu client forget --yes`")
        if not sys.stdin.isatty():
            raise ApiError(refusal)
        try:
            answer = input("Delete your history and every personal adapter version? Type 'forget' to confirm: ")
        except EOFError:  # Ctrl-D
            raise ApiError("nothing deleted: no confirmation was typed") from None
        if answer.strip() != "forget":
            print("nothing deleted")
            return 1
    res = api.call("POST", "/v1/forget", json={"confirm": True})
    d = res["deleted"]
    print(f"deleted {d['history_items']} history items, profile: {'yes' if d['profile'] else 'none'}, "
          f"adapter versions: {', '.join(d['adapter_versions']) or 'none'}, {d['job_records']} job records, "
          f"{len(d.get('derived_files', []))} files derived from the history")
    return 0


COMMANDS = {"daemon": cmd_daemon, "add": cmd_add, "delete": cmd_delete, "search": cmd_search, "ask": cmd_ask,
            "train": cmd_train, "jobs": cmd_jobs, "cancel": cmd_cancel, "status": cmd_status, "export": cmd_export,
            "import": cmd_import, "forget": cmd_forget}


def run(args: argparse.Namespace) -> int:
    """Run `oppu client <command>` (client/cli.py names it in args.client_command)."""
    return COMMANDS[args.client_command](args)
