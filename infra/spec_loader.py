"""Load a spec file keeping YAML positions, so every error names its file, line and column."""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError

from infra.errors import Problem, UserError
from infra.spec import ClusterSpec
from infra.spec_rules import SpecPath, SpecRuleViolations

Positions = dict[SpecPath, tuple[int, int]]


def load_spec_file(path: Path) -> ClusterSpec:
    data, positions = read_yaml(path)
    return validate_spec_data(data, positions, str(path))


def read_yaml(path: Path) -> tuple[Any, Positions]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(
            f"spec file {path} does not exist",
            [Problem("no such file", file=str(path), hint="see hosts/ for examples")],
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read {path}", [Problem(str(error), file=str(path))]) from None
    yaml = YAML(typ="rt")
    yaml.allow_duplicate_keys = False
    try:
        document = yaml.load(text)
    except MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        raise UserError(
            f"{path} is not valid YAML",
            [
                Problem(
                    (error.problem or str(error)).strip(),
                    file=str(path),
                    line=mark.line + 1 if mark else None,
                    column=mark.column + 1 if mark else None,
                    hint=(error.context or "").strip() or None,
                )
            ],
        ) from None
    if not isinstance(document, CommentedMap):
        raise UserError(
            f"{path} is not a cluster spec",
            [
                Problem(
                    "the top level must be a mapping (name:, provider:, site:, ...)", file=str(path)
                )
            ],
        )
    positions: Positions = {}
    _collect_positions(document, (), positions)
    return _plain(document), positions


def _collect_positions(node: Any, path: SpecPath, positions: Positions) -> None:
    if isinstance(node, CommentedMap):
        for key in node:
            line, column = node.lc.key(key)
            child: SpecPath = (*path, str(key))
            positions[child] = (line + 1, column + 1)
            _collect_positions(node[key], child, positions)
    elif isinstance(node, CommentedSeq):
        for index, item in enumerate(node):
            line, column = node.lc.item(index)
            child = (*path, index)
            positions[child] = (line + 1, column + 1)
            _collect_positions(item, child, positions)


def _plain(node: Any) -> Any:
    if isinstance(node, dict):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    if isinstance(node, str):
        return str(node)
    return node


def validate_spec_data(data: Any, positions: Positions, filename: str) -> ClusterSpec:
    try:
        return ClusterSpec.model_validate(data)
    except ValidationError as error:
        problems = [_problem_from_pydantic(e, positions, filename) for e in error.errors()]
    except SpecRuleViolations as error:
        problems = [
            _locate(
                Problem(v.message, path=_dotted(v.path), hint=v.hint), v.path, positions, filename
            )
            for v in error.violations
        ]
    count = len(problems)
    raise UserError(
        f"{filename}: {count} problem{'s' if count > 1 else ''} in the cluster spec", problems
    )


def _problem_from_pydantic(error: Any, positions: Positions, filename: str) -> Problem:
    loc: SpecPath = tuple(part for part in error["loc"] if not _is_internal(part))
    kind = error["type"]
    message = error["msg"].removeprefix("Value error, ")
    hint: str | None = None
    if kind == "extra_forbidden":
        allowed = _fields_at(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        message = f"unknown key {loc[-1]!r}"
        hint = f"did you mean {close[0]!r}?" if close else f"allowed keys: {', '.join(allowed)}"
    elif kind == "missing":
        message = f"missing required key {loc[-1]!r}"
        hint = "add it (see docs/spec.md)"
    elif kind in ("literal_error", "enum"):
        hint = "use one of the listed values"
        value = error.get("input")
        expected = error.get("ctx", {}).get("expected", "")
        choices = [c.strip(" '") for c in expected.replace(" or ", ",").split(",") if c.strip()]
        close = difflib.get_close_matches(str(value), choices, n=1)
        if close:
            hint = f"did you mean {close[0]!r}?"
    elif kind == "string_pattern_mismatch":
        hint = _pattern_hint(str(loc[-1]) if loc else "")
    problem = Problem(message, path=_dotted(loc), hint=hint)
    return _locate(problem, loc, positions, filename)


def _is_internal(part: str | int) -> bool:
    # pydantic adds validator and union-member names to locations; they are not spec keys.
    return isinstance(part, str) and ("[" in part or part.startswith("function-"))


def _pattern_hint(field: str) -> str:
    hints = {
        "name": "lowercase letters, digits and '-', starting with a letter",
        "image": "a repository:tag, ideally pinned with @sha256:<digest>",
        "source": "a Hugging Face id such as deepseek-ai/DeepSeek-R1",
        "env": "an environment variable name in capitals, e.g. DEEPFLEET_API_KEY",
    }
    return hints.get(field, "see docs/spec.md for the expected format")


def _locate(problem: Problem, loc: SpecPath, positions: Positions, filename: str) -> Problem:
    problem.file = filename
    for end in range(len(loc), -1, -1):
        if loc[:end] in positions:
            problem.line, problem.column = positions[loc[:end]]
            break
    return problem


def _dotted(loc: SpecPath) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def _fields_at(loc: SpecPath) -> list[str]:
    """Names of the keys allowed at a spec path, to suggest one for a typo."""
    current: Any = ClusterSpec
    for part in loc:
        current = _unwrap(current)
        if isinstance(part, int):
            args = typing.get_args(current)
            current = args[0] if args else None
        elif isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(part)
            current = field.annotation if field else None
        else:
            return []
    current = _unwrap(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _unwrap(annotation: Any) -> Any:
    while True:
        origin = typing.get_origin(annotation)
        if origin in (typing.Union, types.UnionType):
            members = [a for a in typing.get_args(annotation) if a is not type(None)]
            annotation = members[0] if len(members) == 1 else annotation
            if len(members) != 1:
                return annotation
        elif origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        else:
            return annotation
