"""Pulumi ComponentResources for deepfleet clusters (see docs/pulumi.md).

`Cluster` is what `__main__.py` builds from a spec; the others are its parts and can be used on
their own. Every component takes `(name, args, opts=None)` with a typed args dataclass, parents
its children to itself, derives child names from `name` and registers its outputs last.
"""

from infra.components.baremetal import (
    BareMetalHost,
    BareMetalHostArgs,
    MaasMachine,
    MaasMachineArgs,
    bootstrap_script,
)
from infra.components.cluster import Cluster, ClusterArgs
from infra.components.hosts import (
    EFA_INTERFACES,
    INSTANCE_STORE_DRIVES,
    GpuHost,
    GpuHostArgs,
    GpuNodePool,
    GpuNodePoolArgs,
    ServiceHost,
    ServiceHostArgs,
    ServicePool,
    ServicePoolArgs,
    gpu_user_data,
)
from infra.components.load_balancer import LoadBalancer, LoadBalancerArgs, TargetDeployment
from infra.components.nat import NatGateway, NatGatewayArgs
from infra.components.network import Network, NetworkArgs
from infra.components.storage import SharedStorage, SharedStorageArgs

__all__ = [
    "EFA_INTERFACES",
    "INSTANCE_STORE_DRIVES",
    "BareMetalHost",
    "BareMetalHostArgs",
    "Cluster",
    "ClusterArgs",
    "GpuHost",
    "GpuHostArgs",
    "GpuNodePool",
    "GpuNodePoolArgs",
    "LoadBalancer",
    "LoadBalancerArgs",
    "MaasMachine",
    "MaasMachineArgs",
    "NatGateway",
    "NatGatewayArgs",
    "Network",
    "NetworkArgs",
    "ServiceHost",
    "ServiceHostArgs",
    "ServicePool",
    "ServicePoolArgs",
    "SharedStorage",
    "SharedStorageArgs",
    "TargetDeployment",
    "bootstrap_script",
    "gpu_user_data",
]
