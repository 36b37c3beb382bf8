"""The README's config reference, printed from the code: every key, its default and its docstring.

`retro-dist config-reference` prints it; a test checks the README holds it, so the two cannot drift.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
import typing

from retro_dist.config import Config

_FIELD_LINE = re.compile(r"^    (\w+): [^=]+(=.*)?$")


def _field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string after it) or, failing that, the `#` comment above it."""
    lines = inspect.getsource(cls).splitlines()
    docs = {}
    for i, line in enumerate(lines):
        match = _FIELD_LINE.match(line)
        if not match:
            continue
        after = lines[i + 1].strip() if i + 1 < len(lines) else ""
        before = lines[i - 1].strip() if i else ""
        if after.startswith('"""'):
            docs[match.group(1)] = after.strip('"')
        elif before.startswith("#"):
            docs[match.group(1)] = before.lstrip("# ")
    return docs


def config_reference() -> str:
    """Markdown table of every config key, its default and its docstring."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        docs = _field_docs(cls)
        defaults = dataclasses.asdict(cls())
        for f in dataclasses.fields(cls):
            lines.append(f"| `{section.name}.{f.name}` | `{defaults[f.name]!r}` | {docs.get(f.name, '')} |")
    return "\n".join(lines)
