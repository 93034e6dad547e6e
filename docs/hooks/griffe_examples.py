"""Griffe extension for the API reference: gradfit's docstrings head their doctests with
``Example:`` (singular), which Google style reads as a note of Markdown text, so ``a**2``
would render as bold; renamed ``Examples:``, the lines render as Python code.

Loaded by mkdocstrings (mkdocs.yml, ``extensions:``); the source files are not touched.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_SINGULAR = re.compile(r"^(?P<indent>[ \t]*)Example:[ \t]*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    def on_object(self, *, obj: Any, **kwargs: Any) -> None:
        docstring = getattr(obj, "docstring", None)
        if docstring is not None and "Example:" in docstring.value:
            docstring.value = _SINGULAR.sub(r"\g<indent>Examples:", docstring.value)
