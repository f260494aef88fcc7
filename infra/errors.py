"""Errors meant for people: what is wrong, where, and how to fix it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Problem:
    """One thing wrong with an input, located as precisely as we can."""

    message: str
    file: str | None = None
    line: int | None = None
    column: int | None = None
    path: str | None = None
    hint: str | None = None

    def render(self) -> str:
        where = self.file or "<input>"
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        text = f"{where}: {self.path + ': ' if self.path else ''}{self.message}"
        if self.hint:
            text += f"\n    hint: {self.hint}"
        return text


@dataclass
class UserError(Exception):
    """Bad input. The CLI prints `render()` and exits 2."""

    title: str
    problems: list[Problem] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__(self.title)

    def render(self, limit: int = 12) -> str:
        lines = [f"error: {self.title}"]
        for problem in self.problems[:limit]:
            lines.append("  " + problem.render().replace("\n", "\n  "))
        if len(self.problems) > limit:
            lines.append(f"  ... and {len(self.problems) - limit} more")
        return "\n".join(lines)
