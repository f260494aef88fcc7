"""Sub-commands of the `deepfleet` CLI.

Each module here exposes ``register(subparsers)``, which adds one sub-command whose parser
sets ``func`` to a callable taking the parsed arguments and returning the exit code.
`infra.cli` discovers the modules, so adding a command means adding a module.
"""
