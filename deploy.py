"""pyinfra deploy: every role, in order, on every host of the inventory.

pyinfra inventory.py deploy.py          # apply
pyinfra inventory.py deploy.py --dry    # what would change (the drift check)
"""

from pyinfra import host

from infra.inventory import current_spec
from roles import role_modules

_spec = current_spec()
_node = _spec.node(host.name)

for _role in role_modules():
    if _role.plan(_spec, _node) is not None:
        _role.apply(spec=_spec, node=_node)
