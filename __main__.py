"""Pulumi program: load the spec named by the stack's `deepfleet:spec`, build the cluster's
components, export what pyinfra and people need. All logic lives in `infra.components`."""

from pathlib import Path

import pulumi

from infra.components import Cluster, ClusterArgs
from infra.errors import UserError
from infra.spec import load_spec

PROJECT_DIR = Path(__file__).resolve().parent

config = pulumi.Config("deepfleet")
try:
    spec = load_spec(PROJECT_DIR / config.require("spec"))
except UserError as error:
    raise pulumi.RunError(error.render()) from None

if spec.provider.aws is not None:
    region = pulumi.Config("aws").get("region")
    if region != spec.provider.aws.region:
        raise pulumi.RunError(
            f"aws:region is {region!r} but the spec says {spec.provider.aws.region!r}: "
            f"pulumi config set aws:region {spec.provider.aws.region}"
        )

cluster = Cluster(
    spec.name,
    ClusterArgs(
        spec=spec,
        ssh_private_key=config.get_secret("sshPrivateKey"),
        deploy_public_key=config.get("deployPublicKey"),
        maas_url=config.get("maasUrl") or None,
        maas_api_key=config.get_secret("maasApiKey"),
    ),
)

for key, value in cluster.stack_outputs.items():
    pulumi.export(key, value)
