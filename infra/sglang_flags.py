"""SGLang's command-line flags, read from the pinned release's source without importing it.

Importing ``sglang.srt.server_args`` needs torch and triton, so we parse the source instead:
``ServerArgs.add_cli_args`` in ``sglang/srt/server_args.py`` registers a few flags with
``parser.add_argument(...)`` and all the others through ``add_cli_args_from_dataclass``, which
turns every ``A[T, "help"]`` / ``A[T, Arg(...)]`` field of the namespace classes listed in
``_INPUT_NAMESPACES`` (``sglang/srt/arg_groups/fields/*.py``) into an argparse option. This
module follows both paths with ``ast`` and applies the same derivation rules as
``sglang.srt.arg_groups.arg_utils`` (bool -> store_true, Literal -> choices, list -> nargs '+',
``cli_name``/``aliases``/``type_parser``/``action``), resolving choice lists that are module
constants in other sglang files.

``check_engine_args`` then reads a command line the way argparse would and reports problems for
people, plus the checks SGLang itself lacks (node rank below nnodes, a port in
--dist-init-addr, a memory fraction inside (0, 1), tp divisible by nnodes).
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Literal

from infra.errors import Problem, UserError

SGLANG_VERSION = "0.5.23"
"""The engine release whose flags we check; bootstrap.sh installs the same (SGLANG_VERSION)."""

LAUNCH_PREFIX: tuple[str, ...] = ("python3", "-m", "sglang.launch_server")
INSTALL_HINT = (
    "run ./bootstrap.sh setup, or: .venv/bin/pip install --no-deps sglang==" + SGLANG_VERSION
)

ValueType = Literal["str", "int", "float", "human-int", "json"]
Nargs = Literal["?", "*", "+"] | int | None  # None: exactly one value, as in argparse


@dataclass(frozen=True)
class FlagInfo:
    """One option of `sglang.launch_server`, as argparse would register it."""

    name: str
    """The canonical spelling (what deepfleet emits)."""
    dest: str
    aliases: tuple[str, ...] = ()
    action: str | None = None
    """None for plain store; 'store_true', 'BooleanOptionalAction', 'DeprecatedStoreTrueAction'..."""
    nargs: Nargs = None
    value_type: ValueType = "str"
    choices: tuple[str, ...] | None = None
    """Allowed values as they are written on the command line; None: anything of value_type."""
    required: bool = False
    deprecated: str | None = None
    """The replacement SGLang names for a deprecated flag."""
    source: str = ""
    """Where it is defined, as file:line inside the sglang package."""

    @property
    def takes_value(self) -> bool:
        return self.nargs != 0

    @property
    def option_strings(self) -> tuple[str, ...]:
        names = (self.name, *self.aliases)
        if self.action == "BooleanOptionalAction":
            names += tuple("--no-" + n[2:] for n in names if n.startswith("--"))
        return names


class SglangNotInstalled(UserError):
    """The pinned sglang source is missing (or another release is installed)."""


# --- locating the source -----------------------------------------------------------------------


def sglang_root() -> Path:
    """The installed sglang package directory, found without importing it."""
    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        raise SglangNotInstalled(
            f"the sglang {SGLANG_VERSION} source is not installed",
            [
                Problem(
                    "deepfleet checks engine flags against sglang's own flag definitions",
                    hint=INSTALL_HINT,
                )
            ],
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    try:
        installed = metadata.version("sglang")
    except metadata.PackageNotFoundError:
        installed = None
    if installed is not None and installed != SGLANG_VERSION:
        raise SglangNotInstalled(
            f"sglang {installed} is installed but deepfleet pins {SGLANG_VERSION}",
            [
                Problem(
                    f"flags would be checked against the wrong release ({root})", hint=INSTALL_HINT
                )
            ],
        )
    if not (root / "srt" / "server_args.py").is_file():
        raise SglangNotInstalled(
            "the installed sglang has no srt/server_args.py",
            [Problem(f"looked in {root}", hint=INSTALL_HINT)],
        )
    return root


# --- a small static evaluator over sglang's modules ---------------------------------------------


class _Unresolved(Exception):
    """An expression that cannot be evaluated without running sglang."""


class _Module:
    def __init__(self, root: Path, name: str) -> None:
        self.root = root
        self.name = name
        self.path = _module_path(root, name)
        self.tree = ast.parse(self.path.read_text(encoding="utf-8"), filename=str(self.path))
        self.assigns: dict[str, ast.expr] = {}
        self.imports: dict[str, tuple[str, str]] = {}
        self.classes: dict[str, ast.ClassDef] = {}
        self.functions: dict[str, ast.FunctionDef] = {}
        for node in self.tree.body:
            self._index(node)

    def _index(self, node: ast.stmt) -> None:
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    self.assigns[target.id] = node.value
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value:
            self.assigns[node.target.id] = node.value
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                self.imports[alias.asname or alias.name] = (node.module, alias.name)
        elif isinstance(node, ast.ClassDef):
            self.classes[node.name] = node
        elif isinstance(node, ast.FunctionDef):
            self.functions[node.name] = node

    def relative(self, node: ast.AST) -> str:
        line = getattr(node, "lineno", 0)
        return f"{self.path.relative_to(self.root.parent)}:{line}"


def _module_path(root: Path, name: str) -> Path:
    parts = name.split(".")
    if parts[0] != "sglang":
        raise _Unresolved(name)
    base = root.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    raise _Unresolved(name)


class _Source:
    """The sglang modules we read, parsed once each."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._modules: dict[str, _Module] = {}

    def module(self, name: str) -> _Module:
        if name not in self._modules:
            self._modules[name] = _Module(self.root, name)
        return self._modules[name]

    def lookup(self, module: _Module, name: str) -> tuple[_Module, ast.AST]:
        """The definition a name refers to in a module, following `from x import y`."""
        for _ in range(8):
            if name in module.assigns:
                return module, module.assigns[name]
            if name in module.classes:
                return module, module.classes[name]
            if name in module.functions:
                return module, module.functions[name]
            if name not in module.imports:
                break
            target, name = module.imports[name]
            module = self.module(target)
        raise _Unresolved(name)

    def value(self, module: _Module, node: ast.AST | _Bound, scope: Scope | None = None) -> object:
        """Evaluate constant-like expressions: literals, names, +, set()/list(), Class.ATTR."""
        scope = scope or {}
        if isinstance(node, _Bound):
            return self.value(node.module, node.expr)
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.List | ast.Tuple | ast.Set):
            return [self.value(module, element, scope) for element in node.elts]
        if isinstance(node, ast.Name):
            if node.id in scope:
                return self.value(module, scope[node.id], scope)
            owner, definition = self.lookup(module, node.id)
            if isinstance(definition, ast.expr):
                return self.value(owner, definition)
            raise _Unresolved(node.id)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            left, right = (
                self.value(module, node.left, scope),
                self.value(module, node.right, scope),
            )
            if isinstance(left, list) and isinstance(right, list):
                return left + right
            raise _Unresolved(ast.unparse(node))
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            owner, definition = self.lookup(module, node.value.id)
            if isinstance(definition, ast.ClassDef):
                body = _class_scope(definition)
                if node.attr in body:
                    return self.value(owner, body[node.attr], body)
            raise _Unresolved(ast.unparse(node))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords:
            if node.func.id in ("set", "list", "tuple", "frozenset", "sorted") and node.args:
                inner = self.value(module, node.args[0], scope)
                if isinstance(inner, list):
                    return inner
            elif not node.args:
                return self._call(module, node.func.id)
        raise _Unresolved(ast.unparse(node))

    def _call(self, module: _Module, name: str) -> object:
        """A no-argument helper such as `_reasoning_parser_choices()`: its final return value,
        with the function's own `from x import y` lines in scope."""
        owner, definition = self.lookup(module, name)
        if not isinstance(definition, ast.FunctionDef):
            raise _Unresolved(name)
        final = definition.body[-1]
        if not isinstance(final, ast.Return) or final.value is None:
            raise _Unresolved(name)
        scope: Scope = {}
        for statement in definition.body:
            if isinstance(statement, ast.ImportFrom) and statement.module:
                for alias in statement.names:
                    target = self.module(statement.module)
                    found_in, expr = self.lookup(target, alias.name)
                    if isinstance(expr, ast.expr):
                        scope[alias.asname or alias.name] = _Bound(found_in, expr)
        return self.value(owner, final.value, scope)


@dataclass(frozen=True)
class _Bound:
    """An expression of another module, placed in a local scope (a function's own import)."""

    module: _Module
    expr: ast.expr


Scope = dict[str, "ast.expr | _Bound"]


def _class_scope(definition: ast.ClassDef) -> Scope:
    scope: Scope = {}
    for statement in definition.body:
        if isinstance(statement, ast.Assign):
            for target in statement.targets:
                if isinstance(target, ast.Name):
                    scope[target.id] = statement.value
    return scope


# --- turning definitions into FlagInfo -------------------------------------------------------


_TYPE_NAMES: dict[str, ValueType] = {
    "int": "int",
    "float": "float",
    "str": "str",
    "human_readable_int": "human-int",
    "json.loads": "json",
    "json_list_type": "json",
}
_NO_VALUE_ACTIONS = {
    "store_true",
    "store_false",
    "store_const",
    "count",
    "help",
    "version",
    "BooleanOptionalAction",
    "DeprecatedStoreTrueAction",
    "DeprecatedAction",
}


def _action_name(node: ast.expr) -> str:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Name):
        return node.id
    return ast.unparse(node)


def _type_name(node: ast.expr | None) -> ValueType:
    if node is None:
        return "str"
    return _TYPE_NAMES.get(ast.unparse(node), "str")


def _choices(values: object) -> tuple[str, ...] | None:
    if not isinstance(values, list):
        return None
    # None in a Literal cannot be written on a command line; argparse compares typed values.
    return tuple(str(v) for v in values if v is not None)


def _nargs(node: ast.expr | None) -> Nargs:
    if node is None or (isinstance(node, ast.Constant) and node.value is None):
        return None
    if isinstance(node, ast.Constant) and node.value == "?":
        return "?"
    if isinstance(node, ast.Constant) and node.value == "*":
        return "*"
    if isinstance(node, ast.Constant) and node.value == "+":
        return "+"
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    return "*"  # argparse.REMAINDER and friends: accept what follows


def _unwrap_optional(node: ast.expr) -> ast.expr:
    if isinstance(node, ast.Subscript) and ast.unparse(node.value) in (
        "Optional",
        "typing.Optional",
    ):
        return node.slice
    if isinstance(node, ast.Subscript) and ast.unparse(node.value) in ("Union", "typing.Union"):
        members = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        rest = [m for m in members if not (isinstance(m, ast.Constant) and m.value is None)]
        return rest[0] if len(rest) == 1 else node
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        sides = [node.left, node.right]
        rest = [m for m in sides if not (isinstance(m, ast.Constant) and m.value is None)]
        return rest[0] if len(rest) == 1 else node
    return node


def _subscript_of(node: ast.expr, *names: str) -> ast.expr | None:
    if isinstance(node, ast.Subscript) and ast.unparse(node.value) in names:
        return node.slice
    return None


def _keywords(call: ast.Call) -> dict[str, ast.expr]:
    return {kw.arg: kw.value for kw in call.keywords if kw.arg is not None}


def _flag_from_field(source: _Source, module: _Module, statement: ast.AnnAssign) -> FlagInfo | None:
    """What `add_cli_args_from_dataclass` registers for one `A[T, ...]` field, if anything."""
    if not isinstance(statement.target, ast.Name):
        return None
    annotation = statement.annotation
    if not (
        isinstance(annotation, ast.Subscript)
        and ast.unparse(annotation.value) in ("A", "Annotated", "typing.Annotated")
        and isinstance(annotation.slice, ast.Tuple)
    ):
        return None
    field_type, *metadata_nodes = annotation.slice.elts
    meta: dict[str, ast.expr] | None = None
    for item in metadata_nodes:
        if isinstance(item, ast.Call) and ast.unparse(item.func) == "Arg":
            meta = _keywords(item)
            break
        if (isinstance(item, ast.Constant) and isinstance(item.value, str)) or isinstance(
            item, ast.JoinedStr
        ):
            meta = {}  # a bare help string
            break
    if meta is None:
        return None
    if _literal_true(meta.get("no_cli")):
        return None
    name = statement.target.id
    cli_name = _string(source, module, meta.get("cli_name")) or "--" + name.replace("_", "-")
    aliases = tuple(_strings(source, module, meta.get("aliases")))
    where = module.relative(statement)
    required = statement.value is None

    def make(**kwargs: object) -> FlagInfo:
        return FlagInfo(name=cli_name, dest=name, aliases=aliases, source=where, **kwargs)  # type: ignore[arg-type]

    if "action" in meta:
        action = _action_name(meta["action"])
        extra = meta.get("action_kwargs")
        nargs: Nargs = 0 if action in _NO_VALUE_ACTIONS else None
        value_type: ValueType = "str"
        if isinstance(extra, ast.Dict):
            for key, value in zip(extra.keys, extra.values, strict=True):
                if isinstance(key, ast.Constant) and key.value == "nargs":
                    nargs = _nargs(value)
                if isinstance(key, ast.Constant) and key.value == "type":
                    value_type = _type_name(value)
        return make(action=action, nargs=nargs, value_type=value_type)

    inner = _unwrap_optional(field_type)
    type_parser = meta.get("type_parser")
    explicit_choices = _choices(_safe_value(source, module, meta.get("choices")))
    literal = _subscript_of(inner, "Literal", "typing.Literal")
    if literal is not None:
        values = literal.elts if isinstance(literal, ast.Tuple) else [literal]
        literal_values = [_safe_value(source, module, v) for v in values]
        first = next((v for v in literal_values if v is not None), "")
        literal_type: ValueType = (
            _type_name(type_parser)
            if type_parser is not None
            else (
                "int" if isinstance(first, int) else "float" if isinstance(first, float) else "str"
            )
        )
        return make(value_type=literal_type, choices=explicit_choices or _choices(literal_values))
    element = _subscript_of(inner, "List", "list", "typing.List")
    if element is not None and type_parser is None:
        return make(
            nargs=_nargs(meta.get("nargs")) or "+",
            value_type=_type_name(element),
            choices=explicit_choices,
        )
    if ast.unparse(inner) == "bool":
        return make(action="store_true", nargs=0)
    return make(
        nargs=_nargs(meta.get("nargs")),
        value_type=_type_name(type_parser if type_parser is not None else inner),
        choices=explicit_choices,
        required=_literal_true(meta.get("required")) or (meta.get("required") is None and required),
    )


def _literal_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _safe_value(source: _Source, module: _Module, node: ast.expr | None) -> object:
    if node is None:
        return None
    try:
        return source.value(module, node)
    except (_Unresolved, RecursionError):
        return None


def _string(source: _Source, module: _Module, node: ast.expr | None) -> str | None:
    value = _safe_value(source, module, node)
    return value if isinstance(value, str) else None


def _strings(source: _Source, module: _Module, node: ast.expr | None) -> list[str]:
    value = _safe_value(source, module, node)
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _flags_of_class(
    source: _Source, module: _Module, definition: ast.ClassDef
) -> Iterator[FlagInfo]:
    for statement in definition.body:
        if isinstance(statement, ast.AnnAssign):
            flag = _flag_from_field(source, module, statement)
            if flag is not None:
                yield flag


def _flag_from_add_argument(
    source: _Source, module: _Module, call: ast.Call, scope: Scope
) -> FlagInfo | None:
    names = [a.value for a in call.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    options = [n for n in names if n.startswith("-")]
    if not options:
        return None
    canonical = next((n for n in options if n.startswith("--")), options[0])
    kw = _keywords(call)
    action = _action_name(kw["action"]) if "action" in kw else None
    default_nargs: Nargs = 0 if action in _NO_VALUE_ACTIONS else None
    nargs = _nargs(kw["nargs"]) if "nargs" in kw else default_nargs
    choices: tuple[str, ...] | None = None
    if "choices" in kw:
        try:
            choices = _choices(source.value(module, kw["choices"], scope))
        except (_Unresolved, RecursionError):
            choices = None
    deprecated = _string(source, module, kw.get("new_flag"))
    if action is not None and action.startswith("Deprecated") and deprecated is None:
        deprecated = "see sglang's help text"
    dest = _string(source, module, kw.get("dest")) or canonical.lstrip("-").replace("-", "_")
    return FlagInfo(
        name=canonical,
        dest=dest,
        aliases=tuple(n for n in options if n != canonical),
        action=action,
        nargs=nargs,
        value_type=_type_name(kw.get("type")),
        choices=choices,
        required=_literal_true(kw.get("required")),
        deprecated=deprecated,
        source=module.relative(call),
    )


def parse_server_args(root: Path) -> dict[str, FlagInfo]:
    """Every flag `sglang.launch_server` accepts, keyed by canonical name."""
    source = _Source(root)
    module = source.module("sglang.srt.server_args")
    server_args = module.classes.get("ServerArgs")
    if server_args is None:
        raise _layout_changed(module, "no class ServerArgs")
    add_cli_args = next(
        (
            s
            for s in server_args.body
            if isinstance(s, ast.FunctionDef) and s.name == "add_cli_args"
        ),
        None,
    )
    if add_cli_args is None:
        raise _layout_changed(module, "no ServerArgs.add_cli_args")
    flags: dict[str, FlagInfo] = {}
    scope: Scope = {}
    for node in _walk_in_order(add_cli_args.body):
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Name):
                scope[target.id] = node.value
        if not isinstance(node, ast.Call):
            continue
        function = ast.unparse(node.func)
        if function == "add_cli_args_from_dataclass":
            for flag in _dataclass_flags(source, module, server_args):
                flags[flag.name] = flag
        elif function.endswith(".add_argument"):
            registered = _flag_from_add_argument(source, module, node, scope)
            if registered is not None:
                flags[registered.name] = registered
    if len(flags) < 50:
        raise _layout_changed(module, f"only {len(flags)} flags found")
    return flags


def _walk_in_order(body: Sequence[ast.stmt]) -> Iterator[ast.AST]:
    """Statements and the calls inside them, in source order."""
    for statement in body:
        yield statement
        for node in ast.walk(statement):
            if isinstance(node, ast.Call):
                yield node


def _dataclass_flags(
    source: _Source, module: _Module, server_args: ast.ClassDef
) -> Iterator[FlagInfo]:
    """The fields `add_cli_args_from_dataclass(parser, ServerArgs)` turns into flags: ServerArgs'
    own annotated fields and those of every class in `_INPUT_NAMESPACES`."""
    yield from _flags_of_class(source, module, server_args)
    namespaces = module.assigns.get("_INPUT_NAMESPACES")
    if not isinstance(namespaces, ast.List):
        raise _layout_changed(module, "no _INPUT_NAMESPACES list")
    for element in namespaces.elts:
        if not isinstance(element, ast.Name):
            continue
        owner, definition = source.lookup(module, element.id)
        if isinstance(definition, ast.ClassDef):
            yield from _flags_of_class(source, owner, definition)


def _layout_changed(module: _Module, what: str) -> UserError:
    return UserError(
        "cannot read sglang's flag definitions",
        [
            Problem(
                f"{what} in {module.path}",
                hint="sglang changed how it registers flags; update infra/sglang_flags.py "
                "for the new release (see docs/sglang.md)",
            )
        ],
    )


# --- public API ----------------------------------------------------------------------------------


@cache
def flag_definitions() -> dict[str, FlagInfo]:
    """Every flag of the pinned sglang, keyed by canonical name (cached)."""
    return parse_server_args(sglang_root())


@cache
def known_flags() -> dict[str, FlagInfo]:
    """Every option string sglang accepts (canonical names, aliases, --no-x forms) -> its flag."""
    spellings: dict[str, FlagInfo] = {}
    for flag in flag_definitions().values():
        for option in flag.option_strings:
            spellings[option] = flag
    return spellings


def closest_flag(option: str) -> str | None:
    """The canonical flag nearest to a misspelling, for hints."""
    spellings = known_flags()
    match = difflib.get_close_matches(option, list(spellings), n=1, cutoff=0.6)
    return spellings[match[0]].name if match else None


@dataclass(frozen=True)
class ArgProblem:
    """One problem with a command line; `index` points into the list that was checked."""

    index: int | None
    message: str
    hint: str | None = None

    def __str__(self) -> str:
        return f"{self.message}; {self.hint}" if self.hint else self.message


_SHELL_VARIABLE = re.compile(r"\$\{?[A-Za-z_][A-Za-z0-9_]*(:?[-=?+][^}]*)?\}?")
_HUMAN_INT = re.compile(r"\d+|(\d+(\.\d+)?)(k|M|G|T)|\d+(Ki|Mi|Gi|Ti)")
_NEGATIVE_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")


def _looks_like_option(token: str) -> bool:
    return token.startswith("-") and token != "-" and not _NEGATIVE_NUMBER.match(token)


def strip_launch_prefix(args: Sequence[str]) -> tuple[list[str], int]:
    """Drop `python3 -m sglang.launch_server` if present; returns the flags and the prefix length."""
    items = list(args)
    if tuple(items[: len(LAUNCH_PREFIX)]) == LAUNCH_PREFIX:
        return items[len(LAUNCH_PREFIX) :], len(LAUNCH_PREFIX)
    if items[:2] == ["sglang", "serve"]:
        return items[2:], 2
    return items, 0


def check_engine_args(args: Sequence[str], *, complete: bool | None = None) -> list[str]:
    """Problems with an `sglang.launch_server` command line, for people; empty when fine.

    `args` is either the whole command (`python3 -m sglang.launch_server --model-path ...`) or a
    fragment of flags (a spec's extra_args). Required flags and multi-node consistency are only
    checked on whole commands (complete=None: decided by the launch prefix).
    """
    return [str(problem) for problem in engine_arg_problems(args, complete=complete)]


def engine_arg_problems(args: Sequence[str], *, complete: bool | None = None) -> list[ArgProblem]:
    """Like `check_engine_args`, with the position of each problem and the hint apart."""
    flags, offset = strip_launch_prefix(args)
    whole = offset > 0 if complete is None else complete
    spellings = known_flags()
    problems: list[ArgProblem] = []
    values_of: dict[str, list[str]] = {}
    position: dict[str, int] = {}
    index = 0
    while index < len(flags):
        at = offset + index
        token = flags[index]
        index += 1
        if not _looks_like_option(token):
            problems.append(
                ArgProblem(at, f"unexpected value {token!r}: sglang takes no positional arguments")
            )
            continue
        option, has_inline, inline = token.partition("=")
        flag = spellings.get(option)
        if flag is None:
            message, hint = _unknown(option)
            problems.append(ArgProblem(at, message, hint))
            while index < len(flags) and not _looks_like_option(flags[index]):
                index += 1  # its values, whatever they are: one problem per unknown flag
            continue
        if has_inline:
            values = [inline]
            if not flag.takes_value:
                problems.append(ArgProblem(at, f"{option} takes no value (got {token!r})"))
                continue
        else:
            values = []
            while index < len(flags) and not _looks_like_option(flags[index]):
                if flag.nargs in (None, "?") and len(values) == 1:
                    break
                if isinstance(flag.nargs, int) and len(values) == flag.nargs:
                    break
                values.append(flags[index])
                index += 1
        problems += [ArgProblem(at, m, h) for m, h in _check_values(option, flag, values)]
        if flag.dest in values_of:
            problems.append(
                ArgProblem(at, f"{flag.name} is given more than once (the last one would win)")
            )
        negated = option.startswith("--no-") and flag.action == "BooleanOptionalAction"
        values_of[flag.dest] = ["false"] if negated else (values or [""])
        position[flag.dest] = at
    for dest, message in _semantic_problems(values_of, whole):
        problems.append(ArgProblem(position.get(dest) if dest else None, message))
    return problems


def _unknown(option: str) -> tuple[str, str | None]:
    if not option.startswith("--"):
        return f"unknown option {option!r}", "sglang takes long options only (--name)"
    spellings = known_flags()
    expansions = sorted({spellings[s].name for s in spellings if s.startswith(option)})
    if len(expansions) == 1:
        return (
            f"{option} is only an abbreviation that argparse expands to {expansions[0]}",
            f"write {expansions[0]} (an abbreviation breaks when a new flag shares the prefix)",
        )
    close = closest_flag(option)
    return (
        f"unknown sglang flag {option} (sglang {SGLANG_VERSION})",
        f"did you mean {close}?" if close else "see `python3 -m sglang.launch_server --help`",
    )


Finding = tuple[str, "str | None"]


def _check_values(option: str, flag: FlagInfo, values: list[str]) -> list[Finding]:
    problems: list[Finding] = []
    if flag.deprecated:
        problems.append(
            (
                f"{option} is deprecated in sglang {SGLANG_VERSION} and will be removed",
                f"use {flag.deprecated}",
            )
        )
    if not flag.takes_value:
        return problems
    if flag.nargs is None and not values:
        return [*problems, (f"{option} needs a value", None)]
    if flag.nargs == "+" and not values:
        return [*problems, (f"{option} needs at least one value", None)]
    for value in values:
        if _SHELL_VARIABLE.search(value):
            continue  # expanded by the container's shell at run time
        problem = _value_problem(option, flag, value)
        if problem:
            problems.append(problem)
    return problems


def _value_problem(option: str, flag: FlagInfo, value: str) -> Finding | None:
    typed = value
    if flag.value_type == "int":
        try:
            typed = str(int(value))
        except ValueError:
            return f"{option} takes an integer, not {value!r}", None
    elif flag.value_type == "float":
        try:
            typed = str(float(value))
        except ValueError:
            return f"{option} takes a number, not {value!r}", None
    elif flag.value_type == "human-int" and not _HUMAN_INT.fullmatch(value.strip()):
        return f"{option} takes an integer, not {value!r}", "suffixes k, M, G, Ki, Mi, Gi allowed"
    elif flag.value_type == "json":
        try:
            json.loads(value)
        except ValueError:
            return f"{option} takes JSON, not {value!r}", None
    if flag.choices is not None and typed not in flag.choices and value not in flag.choices:
        close = difflib.get_close_matches(value, list(flag.choices), n=1)
        shown = ", ".join(flag.choices[:12]) + (", ..." if len(flag.choices) > 12 else "")
        return (
            f"{option} {value!r} is not one of: {shown}",
            f"did you mean {close[0]!r}?" if close else None,
        )
    return None


def _number(values: dict[str, list[str]], dest: str, kind: type[int] | type[float]) -> float | None:
    given = values.get(dest)
    if not given or _SHELL_VARIABLE.search(given[-1]):
        return None
    try:
        return kind(given[-1])
    except ValueError:
        return None  # reported as a type problem


def _semantic_problems(values: dict[str, list[str]], whole: bool) -> list[tuple[str, str]]:
    """What deepfleet checks on top of argparse: SGLang accepts these and fails (or hangs)
    later. Returns (dest of the flag to point at, message)."""
    problems: list[tuple[str, str]] = []
    nnodes = _number(values, "nnodes", int)
    node_rank = _number(values, "node_rank", int)
    tp = _number(values, "tp_size", int)
    if whole:
        nnodes = 1 if nnodes is None and "nnodes" not in values else nnodes
        node_rank = 0 if node_rank is None and "node_rank" not in values else node_rank
        tp = 1 if tp is None and "tp_size" not in values else tp
    if nnodes is not None and nnodes < 1:
        problems.append(("nnodes", f"--nnodes must be at least 1, not {nnodes:g}"))
    if node_rank is not None and node_rank < 0:
        problems.append(("node_rank", f"--node-rank must not be negative ({node_rank:g})"))
    if nnodes is not None and node_rank is not None and nnodes >= 1 and node_rank >= nnodes:
        problems.append(
            (
                "node_rank",
                f"--node-rank {node_rank:g} must be below --nnodes {nnodes:g} (ranks count from 0)",
            )
        )
    if tp is not None and nnodes is not None and nnodes >= 1 and tp % nnodes:
        problems.append(("tp_size", f"--tp-size {tp:g} is not divisible by --nnodes {nnodes:g}"))
    address = values.get("dist_init_addr")
    if address and address[-1]:
        problem = _address_problem(address[-1])
        if problem:
            problems.append(("dist_init_addr", problem))
    elif whole and nnodes is not None and nnodes > 1:
        problems.append(("nnodes", "--nnodes > 1 needs --dist-init-addr <rank-0 host>:<port>"))
    fraction = _number(values, "mem_fraction_static", float)
    if fraction is not None and not 0 < fraction < 1:
        problems.append(
            (
                "mem_fraction_static",
                f"--mem-fraction-static must be between 0 and 1 (exclusive), not {fraction:g}",
            )
        )
    if whole:
        for flag in flag_definitions().values():
            if flag.required and flag.dest not in values:
                problems.append(("", f"{flag.name} is required"))
    return problems


def _address_problem(address: str) -> str | None:
    if _SHELL_VARIABLE.search(address):
        return None
    host, colon, port = address.rpartition(":")
    if not colon or not host:
        return f"--dist-init-addr {address!r} needs host:port (e.g. 192.0.2.11:5000)"
    if host.startswith("[") != host.endswith("]"):
        return f"--dist-init-addr {address!r}: write IPv6 hosts as [addr]:port"
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        return f"--dist-init-addr {address!r}: the port must be a number from 1 to 65535"
    return None
