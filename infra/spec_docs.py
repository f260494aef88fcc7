"""Generate docs/spec.md, the spec reference, from the pydantic models themselves.

    python -m infra.spec_docs > docs/spec.md

tests/test_spec_docs.py fails when the committed reference no longer matches the models.
"""

from __future__ import annotations

import inspect
import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from infra.spec import ClusterSpec

INTRO = """# Cluster spec reference

Generated from `infra/spec.py` by `python -m infra.spec_docs`; do not edit by hand.
Unknown keys are errors. Cross-field rules (unique names and addresses, addresses inside their
networks, bond members, replicas with the GPUs their parallelism needs, models that fit, free
ports...) are in `infra/spec_rules.py` and `infra/spec_fit.py`. Examples: `hosts/*.yaml`.
"""


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is typing.Literal:
        return " | ".join(f"`{a}`" for a in args)
    if origin in (list, dict, tuple):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _models(root: type[BaseModel]) -> list[type[BaseModel]]:
    seen: list[type[BaseModel]] = []

    def visit(annotation: Any) -> None:
        is_model = inspect.isclass(annotation) and issubclass(annotation, BaseModel)
        if is_model and annotation not in seen:
            seen.append(annotation)
            for field in annotation.model_fields.values():
                visit(field.annotation)
        for arg in typing.get_args(annotation):
            visit(arg)

    visit(root)
    return seen


def _default(field: Any) -> str:
    if field.is_required():
        return "**required**"
    value = field.default
    if value is PydanticUndefined:
        return ""
    if isinstance(value, BaseModel):
        return "(defaults)"
    return f"`{value!r}`" if value not in ([], {}) else "empty"


def render() -> str:
    lines = [INTRO]
    for model in _models(ClusterSpec):
        lines += [f"## {model.__name__}", ""]
        doc = model.__dict__.get("__doc__")  # the class's own docstring, not an inherited one
        if doc:
            lines += [inspect.cleandoc(doc).splitlines()[0], ""]
        lines += ["| key | type | default |", "|---|---|---|"]
        for name, field in model.model_fields.items():
            kind = _type_name(field.annotation).replace("|", "\\|")
            lines.append(f"| `{name}` | {kind} | {_default(field)} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
