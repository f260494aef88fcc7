"""The SGLang engine command and container invocation for every deployment, replica and rank.

One `EngineLaunch` per node that runs an engine: the `python3 -m sglang.launch_server` command
line (`engine_args`), the `docker run` that wraps it (`container_args`), the NCCL/Gloo
environment and the unit name. Everything comes from the spec (and the model catalog for the
weight size); nothing here touches a host. See docs/sglang.md.

On nodes with RoCE ports, the unit runs `NCCL_ENV_SCRIPT` before the container starts: it reads
the node's GID table and writes ``NCCL_IB_GID_INDEX`` to `EngineLaunch.nccl_env_file`, which
the container reads (`--env-file`). The index is the node's, at that moment: it moves with the
order addresses were added, so no value fixed at deploy time can be trusted. A deployment's
``env`` that sets ``NCCL_IB_GID_INDEX`` pins it instead (no probe).

The API key never appears in a command: the engine reads it from `$SGLANG_API_KEY`, which the
container gets from the deployment's env file (written on the node, mode 0600, from the spec's
SecretRef at deploy time) and which the container's shell expands when it starts the engine.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from facts.roce_gid import Port
from infra.errors import Problem, UserError
from infra.gpus import declared_gpu
from infra.models import ModelArch, resolve_model
from infra.sglang_flags import LAUNCH_PREFIX
from infra.sizing import DEFAULT_CONTEXT, check_deployment_fits
from infra.sizing import weights_gb as sized_weights_gb
from infra.spec import ClusterSpec, Deployment, ModelRef, Network, Node

MODELS_DIR = "/models"
ENV_DIR = "/etc/deepfleet"
API_KEY_VARIABLE = "SGLANG_API_KEY"
API_KEY_REFERENCE = "${" + API_KEY_VARIABLE + "}"
GID_INDEX_VARIABLE = "NCCL_IB_GID_INDEX"
NCCL_ENV_SCRIPT = "/usr/local/sbin/deepfleet-nccl-env"
"""facts/roce_gid.py on the node: writes NCCL_IB_GID_INDEX from the RoCE GID table."""
NCCL_ENV_DIR = "/run/deepfleet"

STORAGE_READ_GB_PER_S = 0.25
"""A conservative rate at which one node reads weights from shared storage (250 MB/s: NFS over
a busy 10 GbE link with every node of a replica reading at once)."""
LOAD_TIME_MARGIN = 1.5
"""Headroom over the pure read time: safetensors parsing, FP8 scale handling, CUDA graph capture."""

# Which networks the engine's sockets (NCCL bootstrap, Gloo, --dist-init-addr) use, best first:
# the storage/RDMA network carries the Mellanox ports and jumbo frames; management otherwise.
_SOCKET_NETWORK_PREFERENCE = ("rdma", "storage", "management", "serving")

# Flags deepfleet sets from the spec, and the spec setting that controls each. The
# engine_args_are_known rule rejects them in extra_args (SGLang would take the last one).
MANAGED_FLAGS: dict[str, str] = {
    "model_path": "models[].path",
    "served_model_name": "the model's name (models[].name)",
    "tp_size": "parallelism.tp",
    "dp_size": "parallelism.dp",
    "attn_dp_size": "parallelism.dp with parallelism.dp_attention",
    "enable_dp_attention": "parallelism.dp_attention",
    "ep_size": "parallelism.ep",
    "host": "nothing (the engine listens on every address; the firewall limits who reaches it)",
    "port": "the deployment's port",
    "trust_remote_code": "nothing (always set)",
    "enable_metrics": "nothing (always set for monitoring)",
    "context_length": "context_length",
    "max_running_requests": "max_running_requests",
    "mem_fraction_static": "mem_fraction_static",
    "nnodes": "replicas (nodes per replica)",
    "node_rank": "replicas (the node's position in its replica)",
    "dist_init_addr": "dist_port (the address is rank 0's)",
    "dist_timeout": "dist_timeout_s",
    "disaggregation_mode": "disaggregation.prefill_replicas",
    "disaggregation_transfer_backend": "disaggregation.transfer_backend",
    "disaggregation_bootstrap_port": "disaggregation.bootstrap_port",
    "api_key": "api_key (a SecretRef; the value never enters a command)",
    "is_embedding": "embedding",
}
# Set by deepfleet only when extra_args does not name them: a spec may choose another parser.
OVERRIDABLE_FLAGS = ("--reasoning-parser", "--tool-call-parser", "--disaggregation-ib-device")


@dataclass(frozen=True)
class EngineLaunch:
    """How one node runs its part of one replica of a deployment."""

    deployment: str
    replica: int
    """Numbered from 1, as in disaggregation.prefill_replicas."""
    rank: int
    """The node's rank inside its replica (SGLang's --node-rank), from 0."""
    node: str
    unit_name: str
    engine_args: list[str]
    container_args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    env_file: str | None = None
    """The env file holding SGLANG_API_KEY, when the deployment has an api_key."""
    nccl_env_file: str | None = None
    """Where `nccl_env_command` writes NCCL_IB_GID_INDEX at every start (RoCE nodes)."""
    nccl_env_command: list[str] = field(default_factory=list)
    """The unit's ExecStartPre that discovers the GID index; empty without RoCE ports."""
    dist_init_addr: str | None = None
    role: str = "serve"
    """'serve', or 'prefill' / 'decode' with disaggregation."""

    @property
    def shell_command(self) -> str:
        """`container_args` as one line for a shell or a systemd ExecStart."""
        return shlex.join(self.container_args)


def launches_for_spec(
    spec: ClusterSpec, node_addresses: Mapping[str, str] | None = None
) -> list[EngineLaunch]:
    """Every engine of the cluster, by deployment, replica and rank.

    `node_addresses` supplies addresses the spec does not hold (cloud nodes get theirs from
    Pulumi's outputs); it is only needed for multi-node replicas there.
    """
    launches: list[EngineLaunch] = []
    for deployment in spec.deployments:
        for number, replica in enumerate(deployment.replicas, start=1):
            for rank, node_name in enumerate(replica):
                launches.append(
                    _launch(spec, deployment, number, rank, node_name, node_addresses or {})
                )
    return launches


def launches_for_node(
    spec: ClusterSpec, node: Node | str, node_addresses: Mapping[str, str] | None = None
) -> list[EngineLaunch]:
    """The engines one node runs (none for a node outside every deployment)."""
    name = node if isinstance(node, str) else node.name
    return [launch for launch in launches_for_spec(spec, node_addresses) if launch.node == name]


def env_file_path(deployment: Deployment | str) -> str:
    """Where the deployment's secrets live on each node (SGLANG_API_KEY=...), mode 0600."""
    name = deployment if isinstance(deployment, str) else deployment.name
    return f"{ENV_DIR}/{name}.env"


# --- one launch --------------------------------------------------------------------------------


def _launch(
    spec: ClusterSpec,
    deployment: Deployment,
    replica: int,
    rank: int,
    node_name: str,
    node_addresses: Mapping[str, str],
) -> EngineLaunch:
    node = spec.node(node_name)
    model = spec.model(deployment.model)
    nodes = [spec.node(n) for n in deployment.replicas[replica - 1]]
    network = _socket_network(spec, nodes)
    role = _role(deployment, replica)
    unit = engine_unit(deployment.name, replica, rank, len(nodes))
    dist_init_addr = None
    if len(nodes) > 1:
        head = _address_on(nodes[0], network, node_addresses)
        dist_init_addr = f"{head}:{deployment.dist_port}"
    engine_args = _engine_args(deployment, model, node, rank, len(nodes), role, dist_init_addr)
    env = _nccl_env(node, network)
    env.update(deployment.env)
    env_file = env_file_path(deployment) if deployment.api_key is not None else None
    nccl_env_file = None
    nccl_env_command: list[str] = []
    if roce_ports(node) and GID_INDEX_VARIABLE not in deployment.env:
        nccl_env_file = f"{NCCL_ENV_DIR}/{unit}.nccl.env"
        nccl_env_command = nccl_env_probe(node, nccl_env_file)
    return EngineLaunch(
        deployment=deployment.name,
        replica=replica,
        rank=rank,
        node=node.name,
        unit_name=unit,
        engine_args=engine_args,
        container_args=_container_args(
            spec,
            deployment,
            model,
            node,
            unit,
            env,
            [f for f in (env_file, nccl_env_file) if f is not None],
            engine_args,
        ),
        env=env,
        env_file=env_file,
        nccl_env_file=nccl_env_file,
        nccl_env_command=nccl_env_command,
        dist_init_addr=dist_init_addr,
        role=role,
    )


def engine_unit(deployment: str, replica: int, rank: int, nnodes: int) -> str:
    """The systemd unit (and container) name of one engine."""
    return f"sglang-{deployment}-r{replica}" + (f"-rank{rank}" if nnodes > 1 else "")


def nccl_env_files(spec: ClusterSpec, node: Node) -> list[str]:
    """The env files NODE's engines read NCCL_IB_GID_INDEX from (RoCE nodes, unpinned
    deployments): what the probe wrote when each engine last started."""
    if not roce_ports(node):
        return []
    return [
        f"{NCCL_ENV_DIR}/{engine_unit(d.name, number, replica.index(node.name), len(replica))}"
        ".nccl.env"
        for d in spec.deployments
        if GID_INDEX_VARIABLE not in d.env
        for number, replica in enumerate(d.replicas, start=1)
        if node.name in replica
    ]


def roce_ports(node: Node) -> list[Port]:
    """NODE's RoCE ports, as the GID probe takes them (the spec's netdev picks among VLANs)."""
    return [Port(d.device, d.port, d.interface) for d in node.rdma if d.link_layer == "ethernet"]


def nccl_env_probe(node: Node, out: str) -> list[str]:
    """The command that writes NCCL_IB_GID_INDEX for NODE's RoCE ports to OUT."""
    ports = [":".join(str(part) for part in p if part is not None) for p in roce_ports(node)]
    return [NCCL_ENV_SCRIPT, "--out", out, *ports]


def _role(deployment: Deployment, replica: int) -> str:
    if deployment.disaggregation is None:
        return "serve"
    return "prefill" if replica in deployment.disaggregation.prefill_replicas else "decode"


def _engine_args(
    deployment: Deployment,
    model: ModelRef,
    node: Node,
    rank: int,
    nnodes: int,
    role: str,
    dist_init_addr: str | None,
) -> list[str]:
    parallel = deployment.parallelism
    extra = list(deployment.extra_args)
    args = [
        *LAUNCH_PREFIX,
        "--model-path",
        f"{MODELS_DIR}/{model.path}",
        "--served-model-name",
        model.name,
        "--tp-size",
        str(parallel.tp),
    ]
    if parallel.dp_attention and parallel.dp > 1:
        # sglang 0.5.23 deprecates `--dp-size D --enable-dp-attention` for this spelling.
        args += ["--attn-dp-size", str(parallel.dp)]
    elif parallel.dp > 1:
        args += ["--dp-size", str(parallel.dp)]
    if parallel.ep > 1:
        args += ["--ep-size", str(parallel.ep)]
    args += ["--host", "0.0.0.0", "--port", str(deployment.port), "--trust-remote-code"]
    args += ["--enable-metrics"]
    if deployment.context_length is not None:
        args += ["--context-length", str(deployment.context_length)]
    if deployment.max_running_requests is not None:
        args += ["--max-running-requests", str(deployment.max_running_requests)]
    fraction = deployment.mem_fraction_static or _sized_mem_fraction(
        deployment, model, node, nnodes
    )
    if fraction is not None:
        args += ["--mem-fraction-static", f"{fraction:.2f}"]
    if nnodes > 1:
        args += ["--nnodes", str(nnodes), "--node-rank", str(rank)]
        args += ["--dist-init-addr", str(dist_init_addr)]
        args += ["--dist-timeout", str(dist_timeout_s(deployment, model))]
    if deployment.disaggregation is not None:
        disaggregation = deployment.disaggregation
        args += ["--disaggregation-mode", role]
        args += ["--disaggregation-transfer-backend", disaggregation.transfer_backend]
        args += ["--disaggregation-bootstrap-port", str(disaggregation.bootstrap_port)]
        if node.rdma and not _names(extra, "--disaggregation-ib-device"):
            args += ["--disaggregation-ib-device", ",".join(d.device for d in node.rdma)]
    reasoning, tool_calls = _parsers(model, deployment)
    if reasoning and not _names(extra, "--reasoning-parser"):
        args += ["--reasoning-parser", reasoning]
    if tool_calls and not _names(extra, "--tool-call-parser"):
        args += ["--tool-call-parser", tool_calls]
    if deployment.embedding:
        args += ["--is-embedding"]
    if deployment.api_key is not None:
        args += ["--api-key", API_KEY_REFERENCE]
    return args + extra


def _names(args: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


# --- model facts (infra/models.py, infra/sizing.py) ---------------------------------------------


def _arch(model: ModelRef) -> ModelArch | None:
    try:
        return resolve_model(model.source)
    except UserError:
        return None  # not in the catalog: no sizing-derived values


def _parsers(model: ModelRef, deployment: Deployment) -> tuple[str | None, str | None]:
    """DeepSeek's output parsers: R1 (and its distills) think in <think>; V3/R1 671B call tools."""
    if deployment.embedding:
        return None, None
    arch = _arch(model)
    name = (arch.hf_id if arch else model.source).lower()
    if arch is not None:
        big = arch.kind == "moe-mla"
    else:
        big = "distill" not in name and ("deepseek-r1" in name or "deepseek-v3" in name)
    reasoning = "deepseek-r1" if "deepseek-r1" in name else None
    tools = "deepseekv3" if big and ("deepseek-r1" in name or "deepseek-v3" in name) else None
    return reasoning, tools


def weights_gb(model: ModelRef) -> float | None:
    """The model's weights in GB as the engine loads them, when the catalog knows the model."""
    arch = _arch(model)
    if arch is None:
        return None
    return sized_weights_gb(arch, model.dtype or arch.dtype)


def dist_timeout_s(deployment: Deployment, model: ModelRef) -> int:
    """--dist-timeout: long enough for every rank to read the weights from shared storage at
    STORAGE_READ_GB_PER_S (with LOAD_TIME_MARGIN), and never below the spec's dist_timeout_s."""
    size = weights_gb(model)
    if size is None:
        return deployment.dist_timeout_s
    needed = size / STORAGE_READ_GB_PER_S * LOAD_TIME_MARGIN
    return max(deployment.dist_timeout_s, math.ceil(needed / 60) * 60)


def _sized_mem_fraction(
    deployment: Deployment, model: ModelRef, node: Node, nnodes: int
) -> float | None:
    """SGLang's --mem-fraction-static as infra/sizing recommends it for this layout, if it fits."""
    arch = _arch(model)
    if node.gpus is None or arch is None:
        return None
    try:
        # The card as the spec declares it: memory_gb may be a slice of the board (MIG, vGPU).
        gpu = declared_gpu(node.gpus.model, node.gpus.memory_gb)
    except UserError:
        return None  # an unknown card: the spec rules report it
    report = check_deployment_fits(
        arch,
        gpu,
        node.gpus.count,
        nnodes,
        deployment.parallelism.tp,
        dtype=model.dtype,
        context=deployment.context_length or DEFAULT_CONTEXT,
    )
    fraction = report.recommended.mem_fraction_static
    return fraction if report.fits and 0 < fraction < 1 else None


# --- network and container ----------------------------------------------------------------------


def _socket_network(spec: ClusterSpec, nodes: Sequence[Node]) -> Network | None:
    """The network every node of a replica has an address on, storage/RDMA first."""
    shared: set[str] | None = None
    for node in nodes:
        names = {a.network for a in node.addresses}
        shared = names if shared is None else shared & names
    candidates = [n for n in spec.networks if shared and n.name in shared]
    for purpose in _SOCKET_NETWORK_PREFERENCE:
        for network in candidates:
            if network.purpose == purpose:
                return network
    return None


def _address_on(node: Node, network: Network | None, overrides: Mapping[str, str]) -> str:
    if network is not None:
        for entry in node.addresses:
            if entry.network == network.name:
                return str(entry.address)
    if node.name in overrides:
        return str(IPv4Address(overrides[node.name]))
    if node.address is not None:
        return str(node.address)
    raise UserError(
        f"no address for node {node.name!r}, rank 0 of a multi-node replica",
        [
            Problem(
                "--dist-init-addr needs the address the other ranks reach rank 0 at",
                path=f"nodes[{node.name}]",
                hint="give the node an address in the spec, or pass node_addresses "
                "(cloud nodes: from Pulumi's outputs)",
            )
        ],
    )


def _nccl_env(node: Node, network: Network | None) -> dict[str, str]:
    env: dict[str, str] = {}
    interface = None
    if network is not None:
        interface = next((a.interface for a in node.addresses if a.network == network.name), None)
    if interface is None:
        management = next((a for a in node.addresses if a.address == node.address), None)
        interface = management.interface if management else None
    if interface is not None:
        env["NCCL_SOCKET_IFNAME"] = interface
        env["GLOO_SOCKET_IFNAME"] = interface
    if node.rdma:
        # '=' makes NCCL match the names exactly (mlx5_1 would otherwise also pick mlx5_10).
        env["NCCL_IB_HCA"] = "=" + ",".join(f"{d.device}:{d.port}" for d in node.rdma)
    env["NCCL_DEBUG"] = "WARN"
    return env


def _container_args(
    spec: ClusterSpec,
    deployment: Deployment,
    model: ModelRef,
    node: Node,
    unit: str,
    env: Mapping[str, str],
    env_files: Sequence[str],
    engine_args: Sequence[str],
) -> list[str]:
    storage = spec.storage_named(model.storage)
    weights = f"{storage.mount_point.rstrip('/')}/{model.path}"
    args = ["docker", "run", "--rm", "--name", unit]
    if node.gpus is not None:
        args += ["--gpus", "all"]  # lab nodes have none; their stand-in needs none
    args += ["--network", "host", "--ipc", "host", "--shm-size", f"{deployment.shm_size_gb}g"]
    args += ["--ulimit", "memlock=-1", "--ulimit", "stack=67108864"]
    if node.rdma:
        # What RDMA needs and nothing more: the verbs devices and pinning memory (no --privileged).
        args += ["--device", "/dev/infiniband", "--cap-add", "IPC_LOCK"]
    args += ["-v", f"{weights}:{MODELS_DIR}/{model.path}:ro"]
    for env_file in env_files:
        args += ["--env-file", env_file]
    # docker lets -e override a key the env files also set.
    for key in sorted(env):
        args += ["-e", f"{key}={env[key]}"]
    key_file = env_file_path(deployment)
    if key_file in env_files and API_KEY_REFERENCE in engine_args:
        # The shell inside the container expands ${SGLANG_API_KEY} from the env file, so the
        # key is in no command line on the host, in no unit file and in no plan.
        # ${VAR:?} stops the start when the env file lacks the key: an empty --api-key would
        # serve without authentication.
        guarded = f'"${{{API_KEY_VARIABLE}:?is not set in {key_file}}}"'
        script = "exec " + " ".join(
            guarded if a == API_KEY_REFERENCE else shlex.quote(a) for a in engine_args
        )
        return [*args, "--entrypoint", "/bin/sh", deployment.image, "-c", script]
    return [*args, deployment.image, *engine_args]
