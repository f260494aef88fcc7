"""Facts about the serving engines: a local image and a running engine container, from Docker.

`EngineContainer` reads `docker inspect` of a container started by a deepfleet unit (the
container's name is the unit's name). The `sglang` role compares it with what the spec's
`EngineLaunch` would start (`container_differences`), so that a container someone started by
hand with other flags or another image shows up in the drift report as a restart to come.
The commands never fail the fact: a missing container or image is a state, not an error.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pyinfra.api.exceptions import FactProcessError
from pyinfra.api.facts import FactBase


def _one_json_object(lines: list[str], what: str) -> dict[str, Any] | None:
    text = "\n".join(lines).strip()
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise FactProcessError(f"{what} did not print JSON: {text[:200]}") from error
    if isinstance(value, list):  # `docker inspect` without --format prints a list
        value = value[0] if value else None
    if value is not None and not isinstance(value, dict):
        raise FactProcessError(f"{what} printed {type(value).__name__}, not an object")
    return value


@dataclass(frozen=True)
class ImageState:
    """A local image: its ID (sha256:...) and the references Docker knows it by."""

    id: str
    repo_tags: tuple[str, ...] = ()
    repo_digests: tuple[str, ...] = ()


def parse_image(lines: list[str]) -> ImageState | None:
    data = _one_json_object(lines, "docker image inspect")
    if data is None:
        return None
    return ImageState(
        id=str(data.get("Id", "")),
        repo_tags=tuple(data.get("RepoTags") or ()),
        repo_digests=tuple(data.get("RepoDigests") or ()),
    )


class DockerImage(FactBase[ImageState | None]):
    """`docker image inspect REF`; None when the image is not on the node (or no docker)."""

    def requires_command(self, ref: str) -> str:
        return "docker"

    def command(self, ref: str) -> str:
        return f"docker image inspect --format '{{{{json .}}}}' {_quote(ref)} 2>/dev/null || true"

    def process(self, output: list[str]) -> ImageState | None:
        return parse_image(output)


@dataclass(frozen=True)
class ContainerState:
    """What a running (or stopped) engine container was started with."""

    name: str
    running: bool
    image_id: str
    """The image's ID (sha256:...) the container runs."""
    image_ref: str
    """The reference given to `docker run` (Config.Image)."""
    entrypoint: tuple[str, ...]
    command: tuple[str, ...]
    network_mode: str = ""
    shm_size: int = 0
    binds: tuple[str, ...] = ()


def parse_container(lines: list[str]) -> ContainerState | None:
    data = _one_json_object(lines, "docker inspect")
    if data is None:
        return None
    config = data.get("Config") or {}
    host_config = data.get("HostConfig") or {}
    state = data.get("State") or {}
    return ContainerState(
        name=str(data.get("Name", "")).lstrip("/"),
        running=bool(state.get("Running")),
        image_id=str(data.get("Image", "")),
        image_ref=str(config.get("Image", "")),
        entrypoint=tuple(config.get("Entrypoint") or ()),
        command=tuple(config.get("Cmd") or ()),
        network_mode=str(host_config.get("NetworkMode", "")),
        shm_size=int(host_config.get("ShmSize") or 0),
        binds=tuple(host_config.get("Binds") or ()),
    )


class EngineContainer(FactBase[ContainerState | None]):
    """`docker inspect NAME` of an engine container; None when there is no such container."""

    def requires_command(self, container: str) -> str:
        return "docker"

    def command(self, container: str) -> str:
        return (
            f"docker inspect --type container --format '{{{{json .}}}}' {_quote(container)} "
            "2>/dev/null || true"
        )

    def process(self, output: list[str]) -> ContainerState | None:
        return parse_container(output)


@dataclass(frozen=True)
class ExpectedContainer:
    """What the unit's `docker run` line asks for, split the way `docker inspect` reports it."""

    image_ref: str
    entrypoint: tuple[str, ...]
    command: tuple[str, ...]
    network_mode: str
    shm_size: int
    binds: tuple[str, ...]


def expected_container(container_args: Sequence[str], image: str) -> ExpectedContainer:
    """Split `docker run [OPTIONS] IMAGE [COMMAND...]` (the builder's `container_args`)."""
    args = list(container_args)
    if image not in args:
        raise ValueError(f"image {image!r} is not in the docker run line: {args}")
    at = args.index(image)
    options, command = args[:at], args[at + 1 :]
    entrypoint: tuple[str, ...] = ()
    network, shm, binds = "default", 0, []
    for i, option in enumerate(options):
        value = options[i + 1] if i + 1 < len(options) else ""
        if option == "--entrypoint":
            entrypoint = (value,)
        elif option == "--network":
            network = value
        elif option == "--shm-size":
            shm = _bytes(value)
        elif option in ("-v", "--volume"):
            binds.append(value)
    return ExpectedContainer(image, entrypoint, tuple(command), network, shm, tuple(binds))


def _bytes(size: str) -> int:
    units = {"b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
    size = size.strip().lower()
    if size and size[-1] in units:
        return int(float(size[:-1]) * units[size[-1]])
    return int(size)


def container_differences(
    running: ContainerState | None,
    expected: ExpectedContainer,
    image_id: str | None = None,
) -> list[str]:
    """How a live container differs from the planned one, in words; empty when it matches.

    No container, or a stopped one, is not a difference: the unit starts it. `image_id` is the
    ID the spec's image has on the node (when known): a container running an older image under
    the same tag is a difference too.
    """
    if running is None or not running.running:
        return []
    found: list[str] = []
    if running.image_ref != expected.image_ref:
        found.append(f"image {running.image_ref} (the spec: {expected.image_ref})")
    elif image_id and running.image_id and running.image_id != image_id:
        found.append(
            f"image ID {running.image_id[:19]} (the node's {expected.image_ref}: {image_id[:19]})"
        )
    if expected.entrypoint and running.entrypoint != expected.entrypoint:
        found.append(
            f"entrypoint {list(running.entrypoint)} (the spec: {list(expected.entrypoint)})"
        )
    if running.command != expected.command:
        extra = [a for a in running.command if a not in expected.command]
        missing = [a for a in expected.command if a not in running.command]
        detail = ", ".join(
            part
            for part in (
                f"extra {extra}" if extra else "",
                f"missing {missing}" if missing else "",
            )
            if part
        )
        found.append(f"engine arguments differ ({detail or 'order'})")
    if running.network_mode and running.network_mode != expected.network_mode:
        found.append(f"network {running.network_mode} (the spec: {expected.network_mode})")
    if expected.shm_size and running.shm_size != expected.shm_size:
        found.append(f"shm size {running.shm_size} (the spec: {expected.shm_size})")
    if sorted(running.binds) != sorted(expected.binds):
        found.append(f"volumes {list(running.binds)} (the spec: {list(expected.binds)})")
    return found


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"
