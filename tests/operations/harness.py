"""Run a role's pyinfra deploy against a fake host whose facts come from a data file.

The data-file idea is pyinfra's own (``tests/operations/<module.op>/<case>.json``: facts in,
commands out), lifted from one operation to a whole role: the role's ``@deploy`` is added to a
real `pyinfra.api.State` over pyinfra's ``@fake`` connector and *executed* with ``run_ops``, so
``_if=`` gates, ``_serial``, callbacks and the reboot's reconnect all run for real; nothing
reaches a machine. Facts are answered from the case file instead of running commands.

A case file (``tests/operations/<role>/<case>.json``)::

    {
      "description": "what the case shows",
      "spec": "hosts/example-baremetal.yaml", "node": "gpu-01",
      "spec_overrides": {"nvidia": {"allow_reboot": true}},     # deep-merged into the spec
      "node_overrides": {"gpus": {"nvswitch": false}},           # deep-merged into the node
      "item_overrides": {"deployments": {"r1": {"env": {"X": "1"}}}},  # into named list items
      "os": "ubuntu-22.04",             # base facts from tests/operations/_os/<os>.json
      "host_data": {"storage_mount_targets": {...}},   # the inventory's host data
      "planned_files": true,            # the role's planned files are on the node already
      "remote_files": {"/etc/x": "content"},   # other files on the node (File/Sha1File facts)
      "facts": {"deb.DebPackages": {...}, "facts.nvidia.NvidiaSmi": {"@fixture": "x.txt"}},
      "facts_after_operation": {"[role] Install x": {...}},  # replaces facts once that
                                        # operation ran a command (what an install left)
      "facts_after_reboot": {...},      # replaces facts once the reboot command ran
      "commands": {"[role] Operation name": ["command", "upload /path", "python:function"]},
      "errors": ["text the failing check logs"]                  # the host fails with these
    }

Fact values: the processed value, as pyinfra's data files give it; ``{"@fixture": NAME}`` or
``{"@output": [lines]}`` run the fact's real ``process()`` on a capture in tests/fixtures/gpu/.
A fact with arguments is a mapping keyed the way pyinfra keys them (``"path=/etc/x"``), unless
the mapping has no such keys (then it answers for every argument, e.g. SystemdStatus). File
facts of paths not given are None (no such file). Any other fact missing is an error naming it.

The harness also notes what the commands did: an upload or a download (``mv`` of pyinfra's
temporary file) makes the file exist, ``apt-mark hold`` adds to ``HeldPackages``, ``systemctl
start|restart|enable`` sets ``SystemdStatus``/``SystemdEnabled``. Those effects are not seen
during the run (the case's facts and its ``facts_after_*`` say what later operations read);
`Result.end_facts` is the node as the run left it, and `second_run` deploys again on it: a role
converges in one run when that second run has no commands.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import posixpath
import re
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime
from inspect import getcallargs
from pathlib import Path
from types import ModuleType
from typing import Any
from unittest import mock

from pyinfra.api.arguments import all_global_arguments
from pyinfra.api.command import FunctionCommand, StringCommand
from pyinfra.api.config import Config
from pyinfra.api.deploy import add_deploy
from pyinfra.api.exceptions import PyinfraError
from pyinfra.api.inventory import Inventory
from pyinfra.api.operations import run_ops
from pyinfra.api.state import State
from pyinfra.api.util import get_kwargs_str
from pyinfra.connectors.fake import FakeConnector

from infra.spec import ClusterSpec, Node, load_spec

PROJECT = Path(__file__).resolve().parents[2]
CASES = Path(__file__).resolve().parent
FIXTURES = PROJECT / "tests" / "fixtures" / "gpu"
REBOOT_COMMAND = re.compile(r"\breboot\b")
DOWNLOAD_MOVE = re.compile(r"^mv /tmp/pyinfra-\w+ (?P<dest>\S+)$")
SYSTEMCTL = re.compile(r"^systemctl (?P<verb>start|restart|enable) (?P<unit>\S+)$")
DOWNLOADED = "(downloaded)\n"
PYINFRA_SUMMARY = re.compile(r"Error: executed \d+ commands")
# Facts about paths: a path the case does not mention does not exist on the node.
PATH_FACTS = {
    "files.File",
    "files.Directory",
    "files.Link",
    "files.Sha1File",
    "files.Md5File",
    "files.Sha256File",
    "files.FileContents",
}
GLOBAL_ARGUMENTS = {name for name, _ in all_global_arguments()}


class MissingFact(AssertionError):
    pass


@dataclass
class Case:
    path: Path
    data: dict[str, Any]

    @property
    def name(self) -> str:
        return f"{self.path.parent.name}/{self.path.stem}"


def load_cases(role: str) -> list[Case]:
    return [
        Case(path, json.loads(path.read_text(encoding="utf-8")))
        for path in sorted((CASES / role).glob("*.json"))
    ]


def deep_merge(base: Any, override: Any) -> Any:
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = deep_merge(base.get(key), value) if key in base else value
        return merged
    return copy.deepcopy(override)


def case_spec(case: Case) -> tuple[ClusterSpec, Node]:
    spec = load_spec(PROJECT / case.data["spec"])
    raw = spec.model_dump(mode="json", exclude_unset=False)
    raw = deep_merge(raw, case.data.get("spec_overrides", {}))
    node_overrides = case.data.get("node_overrides")
    if node_overrides:
        raw["nodes"] = [
            deep_merge(n, node_overrides) if n["name"] == case.data["node"] else n
            for n in raw["nodes"]
        ]
    for section, by_name in case.data.get("item_overrides", {}).items():
        raw[section] = [deep_merge(item, by_name.get(item["name"], {})) for item in raw[section]]
    merged = ClusterSpec.model_validate(raw)
    return merged, merged.node(case.data["node"])


def _parse_value(fact_cls: type, value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"@fixture"}:
        lines = (FIXTURES / value["@fixture"]).read_text(encoding="utf-8").splitlines()
        return fact_cls().process(lines)
    if isinstance(value, dict) and set(value) == {"@output"}:
        return fact_cls().process(list(value["@output"]))
    if isinstance(value, str) and value.startswith("datetime:"):
        return datetime.fromisoformat(value[len("datetime:") :])
    return value


def merge_facts(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """A fact given again replaces the earlier value; path facts merge path by path."""
    merged = dict(base)
    for name, value in override.items():
        if name in PATH_FACTS or name == "server.Which":
            merged[name] = {**base.get(name, {}), **value}
        else:
            merged[name] = value
    return merged


def file_facts(files: dict[str, str]) -> dict[str, dict[str, Any]]:
    """File, Sha1File and parent Directory facts for files present with CONTENT."""
    facts: dict[str, dict[str, Any]] = {
        "files.File": {},
        "files.Sha1File": {},
        "files.Directory": {},
    }
    for path, content in files.items():
        key = f"path={path}"
        facts["files.File"][key] = {
            "user": "root",
            "group": "root",
            "mode": 644,
            "size": len(content.encode()),
            "mtime": datetime(2026, 1, 1),
        }
        facts["files.Sha1File"][key] = hashlib.sha1(content.encode()).hexdigest()
        parent = posixpath.dirname(path)
        while parent not in ("", "/"):
            facts["files.Directory"][f"path={parent}"] = {
                "user": "root",
                "group": "root",
                "mode": 755,
            }
            parent = posixpath.dirname(parent)
    return facts


class FactSource:
    """Answers `host.get_fact` from the case; switches to the post-reboot facts on demand."""

    def __init__(self, case: Case, planned: dict[str, str]) -> None:
        os_name = case.data.get("os")
        base: dict[str, Any] = {}
        if os_name:
            base = json.loads((CASES / "_os" / f"{os_name}.json").read_text(encoding="utf-8"))
        remote = dict(planned) | case.data.get("remote_files", {})
        self.facts = merge_facts(merge_facts(base, file_facts(remote)), case.data.get("facts", {}))
        self.after_reboot = case.data.get("facts_after_reboot")
        self.after_operation: dict[str, Any] = dict(case.data.get("facts_after_operation", {}))
        # What the commands did, in order: (kind, *details); applied by `end_state` only.
        self.effects: list[tuple[str, ...]] = []
        self.case = case
        self.requested: list[str] = []

    def rebooted(self) -> None:
        if self.after_reboot is not None:
            self.facts = merge_facts(self.facts, self.after_reboot)

    def operation_ran(self, name: str) -> None:
        after = self.after_operation.pop(name, None)
        if after is not None:
            self.facts = merge_facts(self.facts, after)

    def wrote(self, path: str, content: str) -> None:
        self.effects.append(("file", path, content))

    def command_ran(self, text: str) -> None:
        words = text.split()
        if words[:2] == ["apt-mark", "hold"]:
            self.effects.append(("hold", *words[2:]))
        elif match := DOWNLOAD_MOVE.match(text):
            self.effects.append(("file", match.group("dest"), DOWNLOADED))
        elif match := SYSTEMCTL.match(text):
            fact = (
                "systemd.SystemdEnabled"
                if match.group("verb") == "enable"
                else "systemd.SystemdStatus"
            )
            self.effects.append(("unit", fact, match.group("unit")))

    def end_state(self) -> dict[str, Any]:
        """The facts after the run: the last facts given, with every effect applied."""
        facts = copy.deepcopy(self.facts)
        for kind, *details in self.effects:
            if kind == "file":
                path, content = details
                facts = merge_facts(facts, file_facts({path: content}))
            elif kind == "hold":
                held = facts.get("facts.nvidia.HeldPackages") or []
                facts["facts.nvidia.HeldPackages"] = sorted(set(held) | set(details))
            elif kind == "unit":
                fact, unit = details
                facts[fact] = {**facts.get(fact, {}), unit: True}
        return facts

    def get_fact(self, fact_cls: type, *args: Any, **kwargs: Any) -> Any:
        name: str = fact_cls.name  # type: ignore[attr-defined]
        fact_kwargs = {k: v for k, v in kwargs.items() if k not in GLOBAL_ARGUMENTS}
        if args or fact_kwargs:
            fact_kwargs = getcallargs(fact_cls().command, *args, **fact_kwargs)
            fact_kwargs.pop("self", None)
        key = get_kwargs_str(fact_kwargs)
        self.requested.append(f"{name}({key})")
        if name not in self.facts:
            if name in PATH_FACTS:
                return None
            raise MissingFact(f"{self.case.name}: no value for fact {name}({key})")
        value = self.facts[name]
        keyed = isinstance(value, dict) and (
            name in PATH_FACTS or name == "server.Which" or any("=" in k for k in value)
        )
        if key and keyed:
            if key not in value:
                if name in PATH_FACTS or name == "server.Which":
                    return None
                raise MissingFact(f"{self.case.name}: no value for fact {name}({key})")
            value = value[key]
        return _parse_value(fact_cls, value)


@dataclass
class Result:
    commands: dict[str, list[str]] = field(default_factory=dict)
    failed: bool = False
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)  # INFO lines the roles logged
    end_facts: dict[str, Any] = field(default_factory=dict)


class _Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def _quiet_pyinfra() -> Iterator[_Recorder]:
    recorder = _Recorder()
    pyinfra_logger = logging.getLogger("pyinfra")
    level = pyinfra_logger.level
    # Unconfigured, the logger passes on WARNING and up only; the roles' notices are INFO.
    pyinfra_logger.setLevel(logging.INFO)
    pyinfra_logger.addHandler(recorder)
    try:
        yield recorder
    finally:
        pyinfra_logger.removeHandler(recorder)
        pyinfra_logger.setLevel(level)


def run_case(case: Case, role: ModuleType) -> Result:
    spec, node = case_spec(case)
    role_plan = role.plan(spec, node)
    planned = (
        {f.path: f.content for f in role_plan.files}
        if role_plan is not None and case.data.get("planned_files")
        else {}
    )
    facts = FactSource(case, planned)
    result = Result()

    fake_host = (
        f"@fake/{node.name}",
        {"fake_delay": 0, "fake_delay_jitter": 0, **case.data.get("host_data", {})},
    )
    inventory = Inventory(([fake_host], {}))  # type: ignore[no-untyped-call]
    config = Config()  # type: ignore[no-untyped-call]
    config.TEMP_DIR = "/tmp"
    state = State(inventory, config)
    (host,) = list(inventory)
    state.activate_host(host)
    host.get_fact = facts.get_fact  # type: ignore[method-assign,assignment]

    def op_name(op_hash: str | None) -> str:
        names = state.get_op_meta(op_hash).names if op_hash else {"(outside an operation)"}
        # @deploy prefixes "role | "; the case files use the operation's own name.
        return sorted(n.split(" | ", 1)[-1] for n in names)[0]

    def record(line: str) -> None:
        op_hash = host.nested_executing_op_hash or host.executing_op_hash
        result.commands.setdefault(op_name(op_hash), []).append(line)

    connector = host.connector
    assert isinstance(connector, FakeConnector)
    real_run = connector.run_shell_command

    def run_shell_command(command: Any, *args: Any, **kwargs: Any) -> Any:
        text = command.get_raw_value() if isinstance(command, StringCommand) else str(command)
        record(text)
        outcome = real_run(command, *args, **kwargs)
        if REBOOT_COMMAND.search(text):
            facts.rebooted()
        facts.command_ran(text)
        op_hash = host.nested_executing_op_hash or host.executing_op_hash
        if op_hash:
            facts.operation_ran(op_name(op_hash))
        return outcome

    def put_file(filename_or_io: Any, remote_filename: str, *args: Any, **kwargs: Any) -> bool:
        record(f"upload {remote_filename}")
        facts.wrote(remote_filename, _read(filename_or_io))
        return True

    real_function_execute = FunctionCommand.execute

    def function_execute(self: FunctionCommand, *args: Any, **kwargs: Any) -> Any:
        # pyinfra's own callbacks (the reboot's reconnect loop) are plumbing, not our steps.
        if not self.function.__module__.startswith("pyinfra."):
            record(f"python:{self.function.__name__}")
        return real_function_execute(self, *args, **kwargs)

    with (
        _quiet_pyinfra() as logs,
        mock.patch.object(connector, "run_shell_command", run_shell_command),
        mock.patch.object(connector, "put_file", put_file),
        mock.patch.object(FunctionCommand, "execute", function_execute),
        mock.patch("pyinfra.operations.server.sleep", lambda seconds: None),
        # Operations' _retry_delay (a verification waiting for a daemon): no real waiting here
        # (this patches time.sleep itself, for the run).
        mock.patch("pyinfra.api.operations.time.sleep", lambda seconds: None),
    ):
        add_deploy(state, role.apply, spec=spec, node=node)
        # pyinfra raises "No hosts remaining!" when the only host fails: that is the result.
        with suppress(PyinfraError):
            run_ops(state)
    result.failed = host in state.failed_hosts
    # pyinfra's own "Error: executed N commands" line follows every failure; the case files hold
    # only what the roles say.
    result.errors = [
        r.getMessage()
        for r in logs.records
        if r.levelno >= logging.ERROR and not PYINFRA_SUMMARY.search(r.getMessage())
    ]
    result.warnings = [r.getMessage() for r in logs.records if r.levelno == logging.WARNING]
    result.notices = [r.getMessage() for r in logs.records if r.levelno == logging.INFO]
    result.end_facts = facts.end_state()
    return result


def _read(filename_or_io: Any) -> str:
    """What an upload sends: pyinfra passes a file object (StringIO) or a local path."""
    if hasattr(filename_or_io, "read"):
        filename_or_io.seek(0)
        data = filename_or_io.read()
    else:
        data = Path(filename_or_io).read_bytes()
    return data.decode() if isinstance(data, bytes) else str(data)


def second_run(case: Case, first: Result) -> Case:
    """The same deploy again, on the node as FIRST left it (its `end_facts`)."""
    data = {
        key: case.data[key]
        for key in (
            "spec",
            "node",
            "spec_overrides",
            "node_overrides",
            "item_overrides",
            "host_data",
        )
        if key in case.data
    }
    data |= {
        "description": f"second run after {case.name}",
        "facts": copy.deepcopy(first.end_facts),
        "commands": {},
    }
    return Case(case.path.with_name(f"{case.path.stem}-second-run.json"), data)
