"""pyinfra deploy: every role, in order, on every host of the inventory.

pyinfra inventory.py deploy.py          # apply
pyinfra inventory.py deploy.py --dry    # what would change (the drift check)
"""

from pyinfra import host

from infra.inventory import current_spec
from roles import role_modules, snapshot_node

_spec = current_spec()
_node = _spec.node(host.name)
_plans = {role: role.plan(_spec, _node) for role in role_modules()}
_roles = {role: plan for role, plan in _plans.items() if plan is not None}

# One round trip for what the node already has (roles/_state.py); the roles then emit
# operations only where it differs.
snapshot_node(_spec, _node, _roles)

# pyinfra names an operation by the line numbers of its call stack alone, so two roles calling
# at the same lines would be one operation and tie the hosts' orders into a cycle. host.loop
# adds the role's place in ROLE_NAMES, the same on every host, to every name.
for _role in host.loop(role_modules()):  # type: ignore[no-untyped-call]
    if _role in _roles:
        _role.apply(spec=_spec, node=_node)
