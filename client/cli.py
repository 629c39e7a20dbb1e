"""`oppu client ...`: start the daemon, and thin commands over its local API.

The commands find the running daemon through DIR/daemon.json and authenticate with DIR/token,
so they need only `--data-dir` (default $OPPU_CLIENT_DIR or ~/.local/share/oppu/client). Before
sending the token they check that the process at that address proves it holds it (GET /identity,
`verify_daemon`): a stale daemon.json never hands the token to whoever took the port. This
module imports only the standard library at parser-building time; `oppu --help` stays instant.
"""

from __future__ import annotations

import argparse
import hmac
import json
import secrets
import sys
import time
from pathlib import Path
from typing import Any, Iterable


def add_client_commands(sub: Any) -> None:
    """Register `oppu client <command>` on the top-level subparsers."""
    p = sub.add_parser("client", help="the personal daemon on this machine and commands that talk to it")
    cs = p.add_subparsers(dest="client_command", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--data-dir", help="the daemon's data directory (default: $OPPU_CLIENT_DIR or "
                       "~/.local/share/oppu/client)")
        q.add_argument("--url", help="daemon URL (default: read from DIR/daemon.json)")
        q.add_argument("--token-file", help="bearer token file (default: DIR/token)")

    q = cs.add_parser("daemon", help="run the daemon (local API, training, federation membership)")
    q.add_argument("--data-dir", help="where history, adapters and the token live (created 0700)")
    q.add_argument("--coordinator", metavar="HOST:PORT", help="join this Flower SuperLink as a SuperNode (over TLS: "
                   "set coordinator_root_certificates, or opt out with --insecure)")
    q.add_argument("--insecure", action="store_true", help="join the coordinator over an unencrypted connection "
                   "(the setting insecure = true; status shows it)")
    q.add_argument("--config", help="daemon TOML (default: DIR/daemon.toml when present)")
    q.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a setting, e.g. --set "
                   "retrain_after=100 or --set base_model.threads=2 (repeatable)")
    q.add_argument("--port", type=int, help="API port on 127.0.0.1 (0 picks a free one)")
    q.add_argument("--task", help="task of the history items (oppu tasks lists them)")
    q.add_argument("--model", help="base model directory (default: the embedded SmolLM2-135M-Instruct)")
    q.add_argument("--quantization", help="nf4 | int8 | none")
    q.add_argument("--threads", type=int, help="torch CPU threads (0: torch's default)")
    q.add_argument("--device", help="auto | cpu | cuda")
    q.set_defaults(func=cmd_daemon)

    q = cs.add_parser("add", help="add history items from a JSON / JSONL file ('-' reads stdin)")
    common(q)
    q.add_argument("file", help='items as {"id", "fields": {...}, "time"} or flat LaMP profile objects')
    q.add_argument("--batch", type=int, default=500, help="items per request")
    q.set_defaults(func=cmd_add)

    q = cs.add_parser("delete", help="delete one history item (the next training no longer sees it)")
    common(q)
    q.add_argument("id", help="the item's id (as added; `oppu client search` shows ids)")
    q.set_defaults(func=cmd_delete)

    q = cs.add_parser("search", help="top-k history items for a query")
    common(q)
    q.add_argument("query")
    q.add_argument("-k", type=int, default=5)
    q.set_defaults(func=cmd_search)

    q = cs.add_parser("ask", help="ask the personalized model")
    common(q)
    q.add_argument("text", nargs="?", help="the question (or give --field NAME=VALUE)")
    q.add_argument("--field", action="append", metavar="NAME=VALUE", help="an item field to build the question from")
    q.add_argument("--no-personal", action="store_true", help="answer without the personal adapter")
    q.add_argument("--json", action="store_true", help="print the full JSON answer")
    q.set_defaults(func=cmd_ask)

    q = cs.add_parser("train", help="train the personal adapter now (shows progress; Ctrl-C cancels)")
    common(q)
    q.add_argument("--epochs", type=float)
    q.add_argument("--lr", type=float)
    q.add_argument("--detach", action="store_true", help="start the job and return")
    q.set_defaults(func=cmd_train)

    q = cs.add_parser("jobs", help="recent jobs")
    common(q)
    q.set_defaults(func=cmd_jobs)

    q = cs.add_parser("cancel", help="cancel a job")
    common(q)
    q.add_argument("job")
    q.set_defaults(func=cmd_cancel)

    q = cs.add_parser("status", help="base model, adapters, history, privacy spent, federation")
    common(q)
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_status)

    q = cs.add_parser("export", help="write history + adapter + manifest to one archive")
    common(q)
    q.add_argument("dest", help="archive to write (.tar.gz)")
    q.set_defaults(func=cmd_export)

    q = cs.add_parser("import", help="import an archive written by export")
    common(q)
    q.add_argument("src")
    q.set_defaults(func=cmd_import)

    q = cs.add_parser("forget", help="delete your history store and every personal-adapter version")
    common(q)
    q.add_argument("--yes", action="store_true", help="do not ask for confirmation (needed without a terminal)")
    q.set_defaults(func=cmd_forget)


# ------------------------------------------------------------------------------------ daemon


def _data_dir(args: argparse.Namespace) -> Path:
    from client.daemon import default_data_dir

    return Path(args.data_dir).expanduser() if args.data_dir else default_data_dir()


def cmd_daemon(args: argparse.Namespace) -> int:
    from client.daemon import DaemonLocked, resolve_spec, run

    ov = list(args.set or [])
    for key, value in (("coordinator", args.coordinator), ("port", args.port), ("task", args.task),
                       ("base_model.path", args.model), ("base_model.quantization", args.quantization),
                       ("base_model.threads", args.threads), ("base_model.device", args.device)):
        if value is not None:
            ov.append(f"{key}={json.dumps(value)}")
    if args.insecure:
        ov.append("insecure=true")
    data_dir = _data_dir(args)
    spec = resolve_spec(data_dir, args.config, ov)
    try:
        return run(data_dir, spec, verbose=args.verbose)
    except DaemonLocked as e:
        print(f"oppu: error: {e}", file=sys.stderr)
        return 3


# ------------------------------------------------------------------------------------ client


class ApiError(RuntimeError):
    """A request the daemon refused (`status`: its HTTP status; `job`: the job it named), or no
    daemon to ask (status 0)."""

    def __init__(self, message: str, status: int = 0, job: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.job = job


class Api:
    def __init__(self, args: argparse.Namespace) -> None:
        import httpx

        d = _data_dir(args)
        url, pid = args.url, None
        if not url:
            try:
                info = json.loads((d / "daemon.json").read_text())
                url, pid = info["url"], info["pid"]
            except FileNotFoundError:
                raise ApiError(f"no daemon is running for {d} (no daemon.json); start one with "
                               f"`oppu client daemon --data-dir {d}`") from None
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ApiError(f"{d / 'daemon.json'} is unreadable ({type(e).__name__}: {e}); "
                               f"start the daemon again: `oppu client daemon --data-dir {d}`") from None
        token_path = Path(args.token_file) if args.token_file else d / "token"
        try:
            token = token_path.read_text().strip()
        except FileNotFoundError:
            raise ApiError(f"{token_path} is missing; the daemon creates it on first start") from None
        self.url = url.rstrip("/")
        verify_daemon(self.url, token, expected_pid=pid, data_dir=d)
        self.client = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {token}"},
                                   timeout=httpx.Timeout(600.0, connect=5.0))

    def call(self, method: str, path: str, **kw: Any) -> Any:
        import httpx

        try:
            r = self.client.request(method, path, **kw)
        except httpx.ConnectError:
            raise ApiError(f"cannot reach the daemon at {self.url}; is it running?") from None
        return self._check(r)

    @staticmethod
    def _check(r: Any) -> Any:
        if r.status_code >= 400:
            job = None
            try:
                body = r.json()
                detail, job = body.get("detail"), body.get("job")
            except ValueError:
                detail = r.text
            if isinstance(detail, list):
                detail = "; ".join(f"{'.'.join(str(x) for x in d.get('loc', []))}: {d.get('msg')}" for d in detail)
            raise ApiError(f"{r.status_code}: {detail}", r.status_code, job if isinstance(job, dict) else None)
        ctype = r.headers.get("content-type", "")
        return r.json() if ctype.startswith("application/json") else r


def verify_daemon(url: str, token: str, *, expected_pid: int | None, data_dir: Path) -> None:
    """Refuse to send the token to a process that cannot prove it holds it (client.daemon.
    identity_proof): after a crash DIR/daemon.json names a port any local process may have taken
    since. With daemon.json, the proven PID must also be the one it records."""
    import httpx

    from client.daemon import IDENTITY_PATH, identity_proof

    stale = (f"DIR/daemon.json may be stale (the daemon crashed?): start it again with "
             f"`oppu client daemon --data-dir {data_dir}`")
    nonce = secrets.token_hex(16)
    try:
        r = httpx.get(url + IDENTITY_PATH, params={"nonce": nonce}, timeout=httpx.Timeout(30.0, connect=5.0))
        answer = r.json() if r.status_code == 200 else None
        proof, pid = (answer["proof"], answer["pid"]) if isinstance(answer, dict) else (None, None)
    except httpx.TransportError:
        raise ApiError(f"cannot reach the daemon at {url}; is it running? {stale}") from None
    except (ValueError, KeyError):
        proof, pid = None, None
    if not (isinstance(proof, str) and isinstance(pid, int)
            and hmac.compare_digest(proof, identity_proof(token, nonce, pid))):
        raise ApiError(f"the process at {url} is not the oppu daemon of {data_dir} (it cannot prove it holds "
                       f"the token); the token was not sent. {stale}")
    if expected_pid is not None and pid != expected_pid:
        raise ApiError(f"the daemon at {url} has pid {pid}, but DIR/daemon.json names pid {expected_pid}; {stale}")


def _with_api(fn: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(Api(args), args)
        except ApiError as e:
            print(f"oppu: error: {e}", file=sys.stderr)
            return 2

    return run


def read_items(path: str) -> list[dict[str, Any]]:
    """Items from JSON (a list, or {"items": [...]}) or JSONL; flat LaMP objects are accepted too.

    Shapes only (the daemon checks the task's fields): a ValueError names the file, the item (and
    line, for JSONL) and the field. Nothing is guessed: an item without an id, a field that is
    not text, or a date that is neither an integer nor an ISO date is refused."""
    from shared.data.lamp import parse_date
    from shared.records import field_text

    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    stripped = text.lstrip()
    lines: list[int | None]
    try:
        if stripped.startswith("["):
            raw = json.loads(text)
            lines = [None] * len(raw)
        elif stripped.startswith("{") and "\n" not in stripped.strip():
            obj = json.loads(text)
            raw = obj.get("items", [obj]) if isinstance(obj, dict) else obj
            if not isinstance(raw, list):
                raise ValueError(f"{path}: 'items' must be a list of item objects")
            lines = [None] * len(raw)
        else:
            raw, lines = [], []
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        raw.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}: line {n}: not valid JSON ({e.msg}, column {e.colno})") from None
                    lines.append(n)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from None
    out = []
    for i, (obj, line) in enumerate(zip(raw, lines)):
        where = f"{path}: item {i}" + (f" (line {line})" if line else "")
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: not a JSON object")
        if "fields" in obj:
            out.append(obj)  # the daemon's own shape; it validates every key
            continue
        flat = dict(obj)  # a LaMP profile item: {"id", <fields>..., "date"?}
        item_id = flat.pop("id", None)
        if isinstance(item_id, bool) or not isinstance(item_id, (str, int)):
            raise ValueError(f"{where}: field 'id' is missing or not text (every item needs a unique id)")
        when = flat.pop("time", None) if "time" in flat else flat.pop("date", None)
        fields = {}
        for k, v in flat.items():
            text = field_text(v, f"{where}: field {k!r}")  # numbers as written, as the daemon reads them
            if text is not None:
                fields[k] = text
        out.append({"id": str(item_id), "fields": fields, "time": 0 if when is None else parse_date(when, where)})
    return out


@_with_api
def cmd_add(api: Api, args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

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
    from urllib.parse import quote

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
    from tqdm.auto import tqdm

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
    from urllib.parse import quote

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
    from shared.fileio import atomic_file

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
