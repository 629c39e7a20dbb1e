"""`flower-superlink` standing in for Flower Hub, offline, for tests of signed app bundles.

A SuperLink hands its SuperNodes publisher signatures only for apps it fetched from Flower Hub
(`flwr run @publisher/app==x.y.z`; a bundle uploaded by `flwr run DIR` carries none). This runs
the real SuperLink with one function replaced: the Hub request (control_handlers._get_remote_fab)
is answered from a catalog file, exactly in the form the Hub returns, so the SuperNodes receive
a bundle and signatures made in the test. Everything the SuperNodes do is Flower's own.

    python hub_superlink.py CATALOG.json <flower-superlink arguments>

CATALOG.json: {"@publisher/app==1.0.0": {"fab": "/path/app.fab",
               "verifications": [{"public_key_id": ..., "signature": base64url, "signed_at": unix time}]}}
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from flwr.superlink.cli import flower_superlink
from flwr.superlink.servicer.control import control_handlers


def main() -> None:
    catalog = json.loads(Path(sys.argv.pop(1)).read_text())

    def from_catalog(fleet_api_type: str | None, app_spec: str) -> tuple[bytes, dict[str, str], str | None]:
        entry = catalog[app_spec]
        return (Path(entry["fab"]).read_bytes(), control_handlers._format_verification(entry["verifications"]),
                None)

    control_handlers._get_remote_fab = from_catalog
    flower_superlink()


if __name__ == "__main__":
    main()
