"""Custom pyinfra facts for deepfleet's roles.

Each fact is a `pyinfra.api.FactBase` with a shell `command` and a pure `process(output)` that
turns the command's stdout lines into typed data. The processing is tested on captured outputs
in `tests/fixtures/facts/`, so a new case is a new file, not new code.
"""
