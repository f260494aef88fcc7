"""pyinfra inventory built from the cluster spec named by $DEEPFLEET_SPEC (default hosts/lab.yaml).

    DEEPFLEET_SPEC=hosts/prod.yaml pyinfra inventory.py deploy.py

Groups are the spec's node groups: gpu, lb, nat, storage, monitoring.
"""

from infra.inventory import current_spec, inventory_groups

_groups = inventory_groups(current_spec())

gpu = _groups["gpu"]
lb = _groups["lb"]
nat = _groups["nat"]
storage = _groups["storage"]
monitoring = _groups["monitoring"]
