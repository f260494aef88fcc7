"""Build the stand-in's container image as a ``docker save`` archive, reproducibly.

The archive is what air-gapped sites carry and load with ``docker load -i``: an OCI image
layout (``oci-layout``, ``index.json``, ``blobs/sha256/...``) plus Docker's ``manifest.json``
and ``repositories``, the layout ``docker save`` writes since Docker 25 and that older engines
(Debian 12's docker.io 20.10) load through ``manifest.json``.

One layer: a Debian rootfs made by ``mmdebstrap --variant=essential`` with ``python3-minimal``
and ``libpython3.11-stdlib`` (``http.server``, ``json``, ``socketserver`` live there), plus the
stand-in under ``/opt/deepfleet-standin`` with an ``sglang.launch_server`` shim, so that the
production command ``python3 -m sglang.launch_server ...`` runs the stand-in unchanged.

Reproducible: ``SOURCE_DATE_EPOCH`` for mmdebstrap, every mtime clamped to it, tar entries
sorted, owners numeric, no logs or caches. The image ID is the SHA-256 of the config JSON, so
the same inputs give the same ID. Debian package versions are inputs too: pin them with a
snapshot.debian.org mirror when IDs must match across days.

Entry point: ``python -m infra.standin.image --out DIR``.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from infra.standin import server

#: Bump when the way the archive is assembled changes (it is part of the cache key).
BUILDER_REVISION = 1
DEFAULT_CACHE_DIR = Path("/var/cache/deepfleet/images")
DEFAULT_EPOCH = 1_700_000_000  # 2023-11-14T22:13:20Z; any fixed value works
INSTALL_DIR = "opt/deepfleet-standin"
REPOSITORY = "deepfleet/sglang-standin"
PATH_ENV = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

#: Paths (relative, no leading slash) left out of the layer: runtime mounts, caches, logs.
_EMPTIED_DIRS = ("dev", "proc", "sys", "run", "tmp", "var/tmp", "var/log", "var/cache/apt")
_DROPPED_FILES = (
    "var/cache/ldconfig/aux-cache",
    "var/cache/debconf/config.dat-old",
    "var/cache/debconf/templates.dat-old",
    "var/lib/dpkg/status-old",
    "var/lib/dpkg/diversions-old",
    "var/lib/dpkg/stat-override-old",
    "etc/machine-id",
    "etc/hostname",
    "etc/resolv.conf",
)

_SHIM_INIT = f'''"""{server.NAME} {server.VERSION}: NOT SGLang.

A lab stand-in that answers SGLang's HTTP surface so that ``python3 -m sglang.launch_server``
works without a GPU. Production images never contain this package.
"""

__version__ = "{server.VERSION_STRING}"
STANDIN = True
'''

_SHIM_LAUNCH_SERVER = f'''"""``python3 -m sglang.launch_server`` runs {server.NAME}: NOT SGLang."""

import sys

from deepfleet_standin import main

if __name__ == "__main__":
    sys.exit(main())
'''


class ImageBuildError(RuntimeError):
    """The image could not be built; the message says why and what to do."""


@dataclass(frozen=True)
class ImageSpec:
    """Every input of the image. Its hash (with the stand-in's source) keys the cache."""

    suite: str = "bookworm"
    mirror: str = "http://deb.debian.org/debian"
    variant: str = "essential"
    packages: tuple[str, ...] = ("python3-minimal", "libpython3.11-stdlib")
    dpkg_excludes: tuple[str, ...] = (
        "/usr/share/man/*",
        "/usr/share/doc/*",
        "/usr/share/locale/*",
        "/usr/share/info/*",
        "/usr/share/lintian/*",
    )
    #: Kept despite the excludes: licences must travel with the image.
    dpkg_includes: tuple[str, ...] = ("/usr/share/doc/*/copyright",)
    repository: str = REPOSITORY
    tag: str = server.VERSION
    source_date_epoch: int = DEFAULT_EPOCH
    architecture: str = "amd64"

    @property
    def repo_tag(self) -> str:
        return f"{self.repository}:{self.tag}"

    def cache_key(self) -> str:
        """SHA-256 over the spec, the stand-in's files and the builder revision."""
        payload = {
            "builder": BUILDER_REVISION,
            "spec": asdict(self),
            "files": {path: _sha256(data) for path, data in sorted(standin_files().items())},
        }
        return _sha256(json.dumps(payload, sort_keys=True).encode())


@dataclass(frozen=True)
class ImageArchive:
    """A built archive: load it with ``docker load -i path``; pin it by ``image_id``."""

    path: Path
    image_id: str
    repo_tag: str
    manifest_digest: str = ""
    size_bytes: int = 0
    cached: bool = False
    timings: dict[str, float] = field(default_factory=dict)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def standin_files() -> dict[str, bytes]:
    """The files the image adds under ``/opt/deepfleet-standin`` (relative path -> bytes)."""
    source = Path(server.__file__).read_bytes()
    return {
        f"{INSTALL_DIR}/deepfleet_standin.py": source,
        f"{INSTALL_DIR}/sglang/__init__.py": _SHIM_INIT.encode(),
        f"{INSTALL_DIR}/sglang/launch_server.py": _SHIM_LAUNCH_SERVER.encode(),
    }


def stage_standin(root: Path) -> Path:
    """Write the stand-in and the ``sglang`` shim under ``root``; return the PYTHONPATH dir.

    With ``PYTHONPATH`` set to the result, ``python3 -m sglang.launch_server`` runs the
    stand-in exactly as it does in the image.
    """
    for relative, data in standin_files().items():
        target = root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        target.chmod(0o644)
    return root / INSTALL_DIR


def image_config(spec: ImageSpec, diff_id: str) -> dict[str, Any]:
    """The image config (its SHA-256 is the image ID)."""
    created = datetime.fromtimestamp(spec.source_date_epoch, tz=timezone.utc)
    created_text = created.strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "architecture": spec.architecture,
        "os": "linux",
        "created": created_text,
        "author": "deepfleet",
        "config": {
            "Env": [
                f"PATH={PATH_ENV}",
                f"PYTHONPATH=/{INSTALL_DIR}",
                "PYTHONUNBUFFERED=1",
                "PYTHONDONTWRITEBYTECODE=1",
            ],
            "Cmd": [
                "python3",
                "-m",
                "sglang.launch_server",
                "--model-path",
                "/models",
                "--host",
                "0.0.0.0",
                "--port",
                "30000",
            ],
            "WorkingDir": "/",
            "ExposedPorts": {"30000/tcp": {}},
            "StopSignal": "SIGTERM",
            "Labels": {
                "org.opencontainers.image.title": server.NAME,
                "org.opencontainers.image.version": server.VERSION,
                "org.opencontainers.image.created": created_text,
                "org.opencontainers.image.description": (
                    "Lab stand-in for SGLang's HTTP server. NOT SGLang; never for production."
                ),
                "org.opencontainers.image.vendor": "deepfleet",
                "io.deepfleet.standin": "true",
            },
        },
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]},
        "history": [
            {
                "created": created_text,
                "created_by": (
                    f"mmdebstrap --variant={spec.variant} "
                    f"--include={','.join(spec.packages)} {spec.suite}; "
                    f"add /{INSTALL_DIR} ({server.VERSION_STRING})"
                ),
            }
        ],
    }


# --------------------------------------------------------------------------- rootfs


def make_rootfs(spec: ImageSpec, target: Path) -> None:
    """Create the Debian rootfs with mmdebstrap (needs root), then strip volatile files."""
    if shutil.which("mmdebstrap") is None:
        raise ImageBuildError(
            "mmdebstrap is not installed; install it with `apt-get install mmdebstrap`"
        )
    if os.geteuid() != 0:
        raise ImageBuildError("building the rootfs needs root (mmdebstrap --mode=root)")
    command = [
        "mmdebstrap",
        "--mode=root",
        "--format=directory",
        f"--variant={spec.variant}",
        f"--architectures={spec.architecture}",
        # bookworm's init-system-helpers would otherwise pull usrmerge and with it perl
        "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
        f"--include={','.join(spec.packages)}",
        *(f"--dpkgopt=path-exclude={pattern}" for pattern in spec.dpkg_excludes),
        *(f"--dpkgopt=path-include={pattern}" for pattern in spec.dpkg_includes),
        spec.suite,
        str(target),
        spec.mirror,
    ]
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(spec.source_date_epoch), "LC_ALL": "C.UTF-8"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-15:])
        raise ImageBuildError(
            f"mmdebstrap failed (exit {result.returncode}) for {spec.suite} from {spec.mirror}:\n"
            f"{tail}\nhint: check that the mirror is reachable and the packages exist"
        )
    strip_volatile(target)


def strip_volatile(root: Path) -> None:
    """Empty runtime mount points, caches and logs; drop files that differ between builds."""
    for relative in _EMPTIED_DIRS:
        directory = root / relative
        if not directory.is_dir() or directory.is_symlink():
            continue
        for child in directory.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    for relative in _DROPPED_FILES:
        path = root / relative
        if path.is_file() or path.is_symlink():
            path.unlink()
    lists = root / "var/lib/apt/lists"
    if lists.is_dir():
        shutil.rmtree(lists)
        lists.mkdir(mode=0o755)


# --------------------------------------------------------------------------- archive


def _walk_sorted(root: Path) -> Iterator[Path]:
    """Every path under root (not root itself), parents first, siblings by byte order."""
    for entry in sorted(os.scandir(root), key=lambda e: e.name.encode("utf-8", "surrogateescape")):
        path = Path(entry.path)
        yield path
        if entry.is_dir(follow_symlinks=False):
            yield from _walk_sorted(path)


def write_layer(root: Path, out: Path, epoch: int) -> str:
    """Write ``root`` as a reproducible layer tar; return its SHA-256 (the diff ID)."""
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in _walk_sorted(root):
            mode = path.lstat().st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)):
                continue  # device nodes, sockets, fifos: the engine provides /dev
            arcname = path.relative_to(root).as_posix()
            info = tar.gettarinfo(str(path), arcname)
            info.mtime = min(int(info.mtime), epoch)
            info.uname = ""
            info.gname = ""
            info.pax_headers = {}
            if info.isreg():
                with path.open("rb") as handle:
                    tar.addfile(info, handle)
            else:
                tar.addfile(info)
    digest = hashlib.sha256()
    with out.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, epoch: int) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = epoch
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _add_dir(tar: tarfile.TarFile, name: str, epoch: int) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mtime = epoch
    info.mode = 0o755
    tar.addfile(info)


def write_archive(spec: ImageSpec, rootfs: Path, out: Path) -> ImageArchive:
    """Write a ``docker save`` archive of ``rootfs`` (already holding the stand-in) to ``out``."""
    epoch = spec.source_date_epoch
    with tempfile.TemporaryDirectory(prefix="standin-layer-", dir=out.parent) as scratch:
        layer_path = Path(scratch) / "layer.tar"
        diff_id = write_layer(rootfs, layer_path, epoch)
        layer_size = layer_path.stat().st_size
        config = _json_bytes(image_config(spec, diff_id))
        image_id = _sha256(config)
        oci_manifest = _json_bytes(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": f"sha256:{image_id}",
                    "size": len(config),
                },
                "layers": [
                    {
                        "mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": f"sha256:{diff_id}",
                        "size": layer_size,
                    }
                ],
            }
        )
        manifest_digest = _sha256(oci_manifest)
        index = _json_bytes(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "manifests": [
                    {
                        "mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "digest": f"sha256:{manifest_digest}",
                        "size": len(oci_manifest),
                        "annotations": {
                            "io.containerd.image.name": f"docker.io/{spec.repo_tag}",
                            "org.opencontainers.image.ref.name": spec.tag,
                        },
                    }
                ],
            }
        )
        docker_manifest = _json_bytes(
            [
                {
                    "Config": f"blobs/sha256/{image_id}",
                    "RepoTags": [spec.repo_tag],
                    "Layers": [f"blobs/sha256/{diff_id}"],
                }
            ]
        )
        repositories = _json_bytes({spec.repository: {spec.tag: diff_id}})
        blobs: list[tuple[str, bytes | None]] = sorted(
            [(diff_id, None), (image_id, config), (manifest_digest, oci_manifest)],
            key=lambda blob: blob[0],
        )
        partial = out.with_name(out.name + ".partial")
        with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
            _add_dir(tar, "blobs", epoch)
            _add_dir(tar, "blobs/sha256", epoch)
            for digest, data in blobs:
                name = f"blobs/sha256/{digest}"
                if data is None:
                    info = tarfile.TarInfo(name)
                    info.size = layer_size
                    info.mtime = epoch
                    info.mode = 0o644
                    with layer_path.open("rb") as handle:
                        tar.addfile(info, handle)
                else:
                    _add_bytes(tar, name, data, epoch)
            _add_bytes(tar, "index.json", index, epoch)
            _add_bytes(tar, "manifest.json", docker_manifest, epoch)
            _add_bytes(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}', epoch)
            _add_bytes(tar, "repositories", repositories, epoch)
        os.replace(partial, out)
    return ImageArchive(
        path=out,
        image_id=f"sha256:{image_id}",
        repo_tag=spec.repo_tag,
        manifest_digest=f"sha256:{manifest_digest}",
        size_bytes=out.stat().st_size,
    )


def verify_archive(path: Path) -> ImageArchive:
    """Check a ``docker save`` archive's structure and digests without a container engine.

    Checks: manifest.json names one config and its layers; every blob's SHA-256 matches its
    name; the config's diff_ids are the layers; index.json points at an OCI manifest whose
    config and layers are those blobs. Raises :class:`ImageBuildError` naming the mismatch.
    """

    def fail(message: str) -> ImageBuildError:
        return ImageBuildError(f"{path}: {message}")

    try:
        with tarfile.open(path, "r:") as tar:
            members = {m.name: m for m in tar.getmembers()}

            def digest_of(name: str) -> str:
                handle = tar.extractfile(members[name]) if name in members else None
                if handle is None:
                    raise fail(f"{name} is missing or not a file")
                digest = hashlib.sha256()
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
                return digest.hexdigest()

            def read_json(name: str) -> Any:
                handle = tar.extractfile(members[name]) if name in members else None
                if handle is None:
                    raise fail(f"{name} is missing or not a file")
                return json.loads(handle.read())

            manifest = read_json("manifest.json")
            if not (isinstance(manifest, list) and len(manifest) == 1):
                raise fail("manifest.json must list exactly one image")
            entry = manifest[0]
            config_name = entry["Config"]
            config_id = digest_of(config_name)
            if config_name != f"blobs/sha256/{config_id}":
                raise fail(f"config blob {config_name} has digest sha256:{config_id}")
            layer_ids = []
            for layer_name in entry["Layers"]:
                layer_id = digest_of(layer_name)
                if layer_name != f"blobs/sha256/{layer_id}":
                    raise fail(f"layer blob {layer_name} has digest sha256:{layer_id}")
                layer_ids.append(f"sha256:{layer_id}")
            config = read_json(config_name)
            if config.get("rootfs", {}).get("diff_ids") != layer_ids:
                raise fail("config rootfs.diff_ids do not match manifest.json's layers")
            index = read_json("index.json")
            descriptor = index["manifests"][0]
            oci_name = "blobs/sha256/" + descriptor["digest"].removeprefix("sha256:")
            if digest_of(oci_name) != descriptor["digest"].removeprefix("sha256:"):
                raise fail("index.json's manifest digest does not match its blob")
            oci = read_json(oci_name)
            if oci["config"]["digest"] != f"sha256:{config_id}":
                raise fail("the OCI manifest names another config")
            if [layer["digest"] for layer in oci["layers"]] != layer_ids:
                raise fail("the OCI manifest names other layers")
            tags = entry.get("RepoTags") or []
            if not tags:
                raise fail("manifest.json has no RepoTags")
    except (KeyError, IndexError, TypeError, AttributeError, ValueError, tarfile.TarError) as error:
        raise fail(f"malformed archive: {error!r}") from error
    return ImageArchive(
        path=path,
        image_id=f"sha256:{config_id}",
        repo_tag=str(tags[0]),
        manifest_digest=str(descriptor["digest"]),
        size_bytes=path.stat().st_size,
    )


# --------------------------------------------------------------------------- cached build


def _archive_name(spec: ImageSpec, key: str) -> str:
    return f"{server.NAME}_{spec.tag}_{spec.architecture}_{key[:16]}.tar"


def _load_cached(path: Path, meta_path: Path) -> ImageArchive | None:
    if not (path.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        return ImageArchive(
            path=path,
            image_id=str(meta["image_id"]),
            repo_tag=str(meta["repo_tag"]),
            manifest_digest=str(meta["manifest_digest"]),
            size_bytes=path.stat().st_size,
            cached=True,
        )
    except (OSError, ValueError, KeyError):
        return None


def _lock_cooperatively(lock: IO[str], poll_s: float = 0.2) -> None:
    """Take an exclusive flock without blocking the process.

    pyinfra runs deploy code for every host in gevent greenlets of one process: a blocking
    ``flock`` would stop the whole process, including the greenlet that holds the lock and
    waits for its mmdebstrap child to finish, a deadlock. ``time.sleep`` yields under gevent's
    monkey patching and is a plain sleep elsewhere.
    """
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            time.sleep(poll_s)


def build_standin_image(
    cache_dir: Path = DEFAULT_CACHE_DIR, spec: ImageSpec | None = None, *, force: bool = False
) -> ImageArchive:
    """Return the stand-in's image archive, building it unless the cache holds it.

    The cache file is named by a hash of every input (spec, stand-in source, builder
    revision). Concurrent callers are serialised with a lock file in ``cache_dir``.
    """
    spec = spec or ImageSpec()
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = spec.cache_key()
    path = cache_dir / _archive_name(spec, key)
    meta_path = path.with_suffix(".json")
    with (cache_dir / ".build.lock").open("w") as lock:
        _lock_cooperatively(lock)
        if not force and (cached := _load_cached(path, meta_path)) is not None:
            return cached
        timings: dict[str, float] = {}
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="standin-rootfs-", dir=cache_dir) as scratch:
            rootfs = Path(scratch) / "rootfs"
            make_rootfs(spec, rootfs)
            timings["rootfs_s"] = round(time.monotonic() - started, 1)
            stage_standin(rootfs)  # mtimes are clamped to the epoch when the layer is written
            archive = write_archive(spec, rootfs, path)
        timings["total_s"] = round(time.monotonic() - started, 1)
        meta = {
            "image_id": archive.image_id,
            "repo_tag": archive.repo_tag,
            "manifest_digest": archive.manifest_digest,
            "size_bytes": archive.size_bytes,
            "cache_key": key,
            "spec": asdict(spec),
            "timings": timings,
        }
        meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return ImageArchive(
            path=archive.path,
            image_id=archive.image_id,
            repo_tag=archive.repo_tag,
            manifest_digest=archive.manifest_digest,
            size_bytes=archive.size_bytes,
            timings=timings,
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m infra.standin.image",
        description=f"Build the {server.NAME} image archive (docker save format).",
    )
    parser.add_argument("--out", type=Path, required=True, help="directory to put the archive")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--mirror", default=ImageSpec.mirror)
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args(argv)
    try:
        archive = build_standin_image(
            args.cache_dir, ImageSpec(mirror=args.mirror), force=args.force
        )
    except ImageBuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    target = args.out / archive.path.name
    if target.resolve() != archive.path.resolve():
        shutil.copyfile(archive.path, target)
    print(
        json.dumps(
            {
                "path": str(target),
                "image_id": archive.image_id,
                "repo_tag": archive.repo_tag,
                "manifest_digest": archive.manifest_digest,
                "size_bytes": archive.size_bytes,
                "cached": archive.cached,
                "timings": archive.timings,
                "load": f"docker load -i {target}",
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
