"""The docs page's prose, kept as Markdown files in ``benchmarks/templates/`` (edit them there, then rebuild the page
with ``python scripts/benchmark.py --docs_only``)."""

from __future__ import annotations

import string
from pathlib import Path

__all__ = ["TEMPLATES", "render"]

#: The folder of the page's Markdown templates.
TEMPLATES = Path(__file__).resolve().parent / "templates"


def render(name: str, **fields: str) -> str:
    """The text of ``templates/<name>`` with its ``$field`` placeholders filled from ``fields``
    (:class:`string.Template`; a literal dollar sign is written ``$$`` in a template).

    Raises:
        FileNotFoundError: no such template.
        KeyError: a placeholder of the template that ``fields`` does not give (the message names it).
    """
    return string.Template((TEMPLATES / name).read_text(encoding="utf-8")).substitute(fields)
