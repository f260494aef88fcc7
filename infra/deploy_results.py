"""Read `pyinfra -y --json` results: which operations changed something, on which hosts.

    pyinfra -y --json inventory.py deploy.py | python -m infra.deploy_results --expect-no-change

Used after a second deploy to prove idempotency (exit 1 and the list when anything changed).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def parse_results(text: str) -> dict[str, Any]:
    payload: dict[str, Any] = json.loads(text[text.index("{") :])
    return payload


def changed_operations(payload: dict[str, Any]) -> list[str]:
    return [
        f"{op['name']} on {', '.join(op['success'])}"
        for op in (payload.get("results") or {}).get("operations", [])
        if op.get("success")
    ]


def failed_operations(payload: dict[str, Any]) -> list[str]:
    return [
        f"{op['name']} on {', '.join(op['error'])}"
        for op in (payload.get("results") or {}).get("operations", [])
        if op.get("error")
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.deploy_results")
    parser.add_argument("--expect-no-change", action="store_true")
    args = parser.parse_args(argv)
    payload = parse_results(sys.stdin.read())
    failed, changed = failed_operations(payload), changed_operations(payload)
    for line in failed:
        print(f"failed:  {line}")
    for line in changed:
        print(f"changed: {line}")
    if failed or (args.expect_no_change and changed):
        return 1
    print("no operation changed anything" if not changed else f"{len(changed)} operations changed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
