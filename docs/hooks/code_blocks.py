"""Fenced code blocks of a Markdown page, in page order.

Shared by the gallery hook (which runs the gallery's figure blocks during the build) and
tests/test_docs.py (which runs every example), so both read the pages the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# an opening fence: indentation, three or more backticks, the language, anything after it
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,})[ \t]*(?P<lang>[\w+-]*)[^\n`]*$")


@dataclass(frozen=True)
class Block:
    language: str
    code: str
    line: int  # 1-based line of the opening fence, for error messages


def code_blocks(text: str) -> list[Block]:
    """Every fenced block (```lang ... ```), its indentation removed, in order."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            line = lines[j]
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            j += 1
        blocks.append(Block(opening["lang"].lower(), "\n".join(body) + "\n", i + 1))
        i = j + 1
    return blocks


def console_commands(block: Block, program: str = "gradfit") -> list[str]:
    """The ``$ program ...`` command lines of a console block (continuation lines joined)."""
    commands: list[str] = []
    current: str | None = None
    for line in block.code.splitlines():
        if current is not None:  # a continued command: "... \" at the end of the last line
            current += " " + line.strip()
        elif line.startswith("$ "):
            current = line[2:].strip()
        else:
            continue  # output shown in the block
        if current.endswith("\\"):
            current = current[:-1].rstrip()
            continue
        if current.split(" ", 1)[0] == program:
            commands.append(current)
        current = None
    return commands
