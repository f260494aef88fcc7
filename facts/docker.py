"""Facts about the Docker engine: `docker info` as JSON, and what the roles read from it."""

from __future__ import annotations

import json
from typing import Any

from pyinfra.api.exceptions import FactProcessError
from pyinfra.api.facts import FactBase


def parse_docker_info(lines: list[str]) -> dict[str, Any] | None:
    """`docker info --format '{{json .}}'` is one JSON object; None when the daemon is down."""
    text = "\n".join(lines).strip()
    if not text:
        return None
    try:
        info = json.loads(text)
    except json.JSONDecodeError as error:
        raise FactProcessError(f"docker info did not print JSON: {text[:200]}") from error
    if not isinstance(info, dict):
        raise FactProcessError(f"docker info printed {type(info).__name__}, not an object")
    # A CLI without a daemon still prints an object: empty server fields (ServerVersion ""),
    # the error on stderr or, with some versions, in ServerErrors.
    if not info.get("ServerVersion"):
        return None
    return info


def runtimes(info: dict[str, Any] | None) -> list[str]:
    return sorted((info or {}).get("Runtimes") or {})


def problems(info: dict[str, Any] | None, *, want_nvidia: bool, data_root: str) -> list[str]:
    """What differs from the wanted engine, in words; empty when all is well."""
    if info is None:
        return ["the docker daemon does not answer (`docker info` failed)"]
    found: list[str] = []
    if want_nvidia and "nvidia" not in runtimes(info):
        found.append(
            f"the 'nvidia' runtime is not registered (runtimes: {', '.join(runtimes(info))})"
        )
    if info.get("DockerRootDir") and info["DockerRootDir"] != data_root:
        found.append(f"data-root is {info['DockerRootDir']}, the spec wants {data_root}")
    if info.get("LoggingDriver") and info["LoggingDriver"] != "json-file":
        found.append(f"log driver is {info['LoggingDriver']}, not json-file")
    return found


class DockerInfo(FactBase[dict[str, Any] | None]):
    """The engine's view of itself; None where docker is missing or its daemon is down."""

    def requires_command(self) -> str:
        return "docker"

    def command(self) -> str:
        # A stopped daemon is a state to report, not a reason to fail fact gathering.
        return "docker info --format '{{json .}}' 2>/dev/null || true"

    def process(self, output: list[str]) -> dict[str, Any] | None:
        return parse_docker_info(output)
