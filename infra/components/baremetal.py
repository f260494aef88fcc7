"""Bare metal: the machines exist; record them and prepare them for pyinfra over SSH.

`BareMetalHost` runs three idempotent `pulumi_command.remote.Command`s on a node, connected with
the spec's address, SSH user and port and the bootstrap private key from the stack's secret
config: install the deploy key (the public key pyinfra will log in with), set the hostname to the
node's spec name, and make sure python3 is there. With MAAS settings (only when the stack config
`deepfleet:maasUrl` is set) a `MaasMachine` first (re-)deploys the machine's operating system
through the `maas` CLI on the machine running Pulumi.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import pulumi
import pulumi_command as command

from infra.components._common import token

BootstrapStep = Literal["deploy-key", "hostname", "python"]


def _sudo(user: str) -> str:
    return "" if user == "root" else "sudo -n "


def bootstrap_script(step: BootstrapStep, node: str, user: str, public_key: str = "") -> str:
    """The shell command of one bootstrap step; each one changes nothing when already done."""
    sudo = _sudo(user)
    if step == "deploy-key":
        key = shlex.quote(public_key.strip())
        return (
            "set -eu; umask 077; mkdir -p ~/.ssh; touch ~/.ssh/authorized_keys; "
            f"grep -qxF {key} ~/.ssh/authorized_keys || echo {key} >> ~/.ssh/authorized_keys"
        )
    if step == "hostname":
        name = shlex.quote(node)
        return (
            f'set -eu; [ "$(hostname)" = {name} ] || {sudo}hostnamectl set-hostname {name}; '
            f"grep -q '[[:space:]]{node}$' /etc/hosts || "
            f"echo '127.0.1.1 {node}' | {sudo}tee -a /etc/hosts >/dev/null"
        )
    return (
        "set -eu; command -v python3 >/dev/null || "
        f"{{ {sudo}apt-get update -q && {sudo}env DEBIAN_FRONTEND=noninteractive "
        "apt-get install -y -q python3; }; python3 --version"
    )


@dataclass(frozen=True)
class MaasMachineArgs:
    cluster: str
    hostname: str
    maas_url: str
    api_key: pulumi.Input[str]
    distro_series: str = "noble"
    timeout_minutes: int = 60


def maas_deploy_script(hostname: str, distro_series: str, timeout_minutes: int) -> str:
    """Release the machine if deployed, deploy it again, wait until MAAS says Deployed."""
    host = shlex.quote(hostname)
    status = (
        'maas deepfleet machine read "$id" | '
        "python3 -c 'import json,sys; print(json.load(sys.stdin)[\"status_name\"])'"
    )
    wait = (
        "wait_for() { for _ in $(seq 1 " + str(timeout_minutes * 2) + "); do "
        f's=$({status}); [ "$s" = "$1" ] && return 0; '
        'case "$s" in Failed*) echo "MAAS: $s" >&2; return 1;; esac; sleep 30; done; '
        'echo "MAAS: timed out waiting for $1" >&2; return 1; }'
    )
    return "; ".join(
        [
            "set -eu",
            'maas login deepfleet "$MAAS_URL" "$MAAS_API_KEY" >/dev/null',
            f"id=$(maas deepfleet machines read hostname={host} | "
            "python3 -c 'import json,sys; print(json.load(sys.stdin)[0][\"system_id\"])')",
            wait,
            f'if [ "$({status})" = Deployed ]; then '
            'maas deepfleet machine release "$id" >/dev/null; wait_for Ready; fi',
            f'maas deepfleet machine deploy "$id" distro_series={shlex.quote(distro_series)} >/dev/null',
            "wait_for Deployed",
        ]
    )


class MaasMachine(pulumi.ComponentResource):
    """Re-images one machine through MAAS (runs where Pulumi runs; needs the `maas` CLI)."""

    deploy: command.local.Command

    def __init__(
        self, name: str, args: MaasMachineArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__(token("MaasMachine"), name, None, opts)
        self.deploy = command.local.Command(
            f"{name}-deploy",
            create=maas_deploy_script(args.hostname, args.distro_series, args.timeout_minutes),
            environment={"MAAS_URL": args.maas_url, "MAAS_API_KEY": args.api_key},
            opts=pulumi.ResourceOptions(parent=self),
        )
        self.register_outputs({"hostname": args.hostname})


@dataclass(frozen=True)
class BareMetalHostArgs:
    cluster: str
    node: str
    address: str
    groups: Sequence[str]
    ssh_user: str
    ssh_port: int
    # Secret: the bootstrap private key (`pulumi config set --secret deepfleet:sshPrivateKey`).
    private_key: pulumi.Input[str]
    # The key pyinfra logs in with, added to the SSH user's authorized_keys when given.
    deploy_public_key: str | None = None
    maas: MaasMachineArgs | None = None


class BareMetalHost(pulumi.ComponentResource):
    address: str
    commands: dict[BootstrapStep, command.remote.Command]
    maas: MaasMachine | None

    def __init__(
        self, name: str, args: BareMetalHostArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__(token("BareMetalHost"), name, None, opts)
        self.address = args.address
        self.maas = (
            MaasMachine(f"{name}-maas", args.maas, pulumi.ResourceOptions(parent=self))
            if args.maas is not None
            else None
        )
        connection = command.remote.ConnectionArgs(
            host=args.address,
            user=args.ssh_user,
            port=float(args.ssh_port),
            private_key=pulumi.Output.secret(args.private_key),
        )
        steps: list[BootstrapStep] = ["hostname", "python"]
        if args.deploy_public_key:
            steps.insert(0, "deploy-key")
        self.commands = {}
        previous: list[pulumi.Resource] = [self.maas] if self.maas is not None else []
        for step in steps:
            cmd = command.remote.Command(
                f"{name}-{step}",
                connection=connection,
                create=bootstrap_script(
                    step, args.node, args.ssh_user, args.deploy_public_key or ""
                ),
                opts=pulumi.ResourceOptions(parent=self, depends_on=previous),
            )
            self.commands[step] = cmd
            previous = [cmd]
        self.register_outputs(
            {"address": args.address, "groups": list(args.groups), "steps": list(steps)}
        )
