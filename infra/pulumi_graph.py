"""The resources a stack would create, computed offline by running the program under mocks.

`resource_graph(spec)` builds the spec's `Cluster` with `pulumi.runtime.set_mocks`, so no
Pulumi CLI, engine, cloud account or network is needed; `deepfleet plan` lists its rows.
`run_offline(program)` is the general form (any program callable, with stack config) and keeps
every resource's inputs and mocked state, for the policy tests.

Mocks see what the engine would: camelCase property names and numbers as floats. The mocked
state echoes the inputs (secrets stay wrapped as secrets) plus a few made-up computed values
(ids, ARNs, private IPs, DNS names) so that outputs built from them resolve.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pulumi
from pulumi.runtime import mocks as pulumi_mocks
from pulumi.runtime import rpc, settings

from infra.spec import ClusterSpec

STACK_TYPE = "pulumi:pulumi:Stack"
# A stand-in for the bootstrap key so that the graph shows the baremetal bootstrap commands.
PLACEHOLDER_KEY = "offline-placeholder-private-key"


@dataclass(frozen=True)
class ResourceRow:
    """One resource of the stack: its type token, logical name and parent's name (None: stack)."""

    type: str
    name: str
    parent: str | None


@dataclass(frozen=True)
class RecordedResource:
    type: str
    name: str
    parent: str | None
    custom: bool
    inputs: Mapping[str, Any]
    state: Mapping[str, Any]

    @property
    def row(self) -> ResourceRow:
        return ResourceRow(self.type, self.name, self.parent)


@dataclass
class Recording:
    resources: list[RecordedResource] = field(default_factory=list)
    outputs: dict[str, Any] = field(default_factory=dict)
    secret_outputs: set[str] = field(default_factory=set)

    def of_type(self, type_: str) -> list[RecordedResource]:
        return [r for r in self.resources if r.type == type_]

    def named(self, name: str) -> RecordedResource:
        return next(r for r in self.resources if r.name == name)


def _fake_ip(name: str) -> str:
    digest = hashlib.sha256(name.encode()).digest()
    return f"10.250.{digest[0]}.{digest[1] % 250 + 2}"


def _computed(type_: str, name: str) -> dict[str, Any]:
    """Made-up values for the outputs the provider would compute."""
    values: dict[str, Any] = {"arn": f"arn:aws:mock:::{name}", "name": name}
    if type_ == "aws:ec2/instance:Instance":
        values["privateIp"] = _fake_ip(name)
    elif type_ == "aws:ec2/eip:Eip":
        values.update(publicIp="203.0.113.250", allocationId=f"eipalloc-{name}")
    elif type_ == "aws:lb/loadBalancer:LoadBalancer":
        values["dnsName"] = f"{name}.elb.us-east-2.amazonaws.com"
    elif type_ == "aws:fsx/lustreFileSystem:LustreFileSystem":
        values.update(dnsName=f"{name}.fsx.us-east-2.amazonaws.com", mountName="mockmnt")
    elif type_ == "aws:efs/fileSystem:FileSystem":
        values["dnsName"] = f"{name}.efs.us-east-2.amazonaws.com"
    return values


class OfflineMocks(pulumi.runtime.Mocks):
    """Echo the inputs back as the state, plus made-up computed values."""

    def new_resource(
        self, args: pulumi.runtime.MockResourceArgs
    ) -> tuple[str | None, dict[str, Any]]:
        state = {**_computed(args.typ, args.name), **args.inputs}
        return f"{args.name}-id", state

    def call(
        self, args: pulumi.runtime.MockCallArgs
    ) -> tuple[dict[str, Any], list[tuple[str, str]] | None]:
        return {}, None


def _name_from_urn(urn: str) -> str | None:
    if not urn or f"::{STACK_TYPE}::" in urn or urn.split("::")[-2].endswith(STACK_TYPE):
        return None
    return urn.split("::")[-1]


class RecordingMonitor(pulumi_mocks.MockMonitor):
    """The SDK's mock monitor, also keeping each resource's parent and inputs."""

    def __init__(self, mocks: pulumi.runtime.Mocks) -> None:
        super().__init__(mocks)
        self.records: list[RecordedResource] = []
        self._lock = threading.Lock()

    def RegisterResource(self, request: Any) -> Any:
        response = super().RegisterResource(request)  # type: ignore[no-untyped-call]
        if request.type != STACK_TYPE:
            inputs = rpc.deserialize_properties(request.object)
            record = RecordedResource(
                type=request.type,
                name=request.name,
                parent=_name_from_urn(request.parent),
                custom=bool(request.custom),
                inputs=inputs,
                state=self.resources[response.urn].state,
            )
            with self._lock:
                self.records.append(record)
        return response


def run_offline(
    program: Callable[[], object],
    config: Mapping[str, str] | None = None,
    secret_keys: Sequence[str] = (),
    mocks: pulumi.runtime.Mocks | None = None,
    project: str = "deepfleet",
    stack: str = "offline",
) -> Recording:
    """Run a Pulumi program under mocks; return its resources and resolved stack outputs.

    Installs fresh mocks and config each call (the Pulumi runtime's settings are global)."""
    monitor = RecordingMonitor(mocks or OfflineMocks())
    pulumi.runtime.set_mocks(
        monitor.mocks, project=project, stack=stack, preview=False, monitor=monitor
    )
    pulumi.runtime.set_all_config(dict(config or {}), list(secret_keys))
    root = settings.get_root_resource()
    exports: dict[str, Any] = getattr(root, "outputs", {})
    exports.clear()
    recording = Recording()

    async def collect(outputs: dict[str, pulumi.Output[Any]]) -> None:
        for key, output in outputs.items():
            recording.outputs[key] = await output.future()
            if await output.is_secret():
                recording.secret_outputs.add(key)

    @pulumi.runtime.test  # type: ignore[untyped-decorator]
    def run() -> pulumi.Output[None]:
        program()
        outputs = {k: pulumi.Output.from_input(v) for k, v in exports.items()}
        return pulumi.Output.from_input(asyncio.ensure_future(collect(outputs)))

    run()
    recording.resources = list(monitor.records)
    return recording


def _tree_order(records: Sequence[RecordedResource]) -> list[ResourceRow]:
    children: dict[str | None, list[RecordedResource]] = {}
    for record in records:
        children.setdefault(record.parent, []).append(record)
    rows: list[ResourceRow] = []

    def visit(parent: str | None) -> None:
        for record in sorted(children.get(parent, []), key=lambda r: (r.type, r.name)):
            rows.append(record.row)
            visit(record.name)

    visit(None)
    return rows


def cluster_resources(spec: ClusterSpec, maas_url: str | None = None) -> list[RecordedResource]:
    """Every resource `pulumi up` would create for `spec`, with the inputs the mocks recorded.

    The baremetal bootstrap is recorded as if its secret key and a deploy public key were set;
    MAAS re-imaging only when `maas_url` is given (as `deepfleet:maasUrl` would). A lab spec has
    no Pulumi stack (`deepfleet lab up` makes its nodes): no resources."""
    from infra.components import Cluster, ClusterArgs

    if spec.provider.kind == "lab":
        return []

    def program() -> None:
        Cluster(
            spec.name,
            ClusterArgs(
                spec=spec,
                ssh_private_key=pulumi.Output.secret(PLACEHOLDER_KEY),
                deploy_public_key="ssh-ed25519 AAAA offline-placeholder",
                maas_url=maas_url,
                maas_api_key=pulumi.Output.secret("offline") if maas_url else None,
            ),
        )

    return run_offline(program).resources


def resource_graph(spec: ClusterSpec, maas_url: str | None = None) -> list[ResourceRow]:
    """`cluster_resources` as rows, parents before children."""
    return _tree_order(cluster_resources(spec, maas_url))


def render_tree(rows: Sequence[ResourceRow]) -> list[str]:
    """One line per resource, indented under its parent: `name (type)`."""
    depth: dict[str, int] = {}
    lines: list[str] = []
    for row in rows:
        level = 0 if row.parent is None else depth.get(row.parent, -1) + 1
        depth[row.name] = level
        lines.append(f"{'  ' * level}{row.name} ({row.type})")
    return lines
