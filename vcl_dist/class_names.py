"""The class-names contract shared by the data and model wings: ``classes.txt``, one class name
per line, in label order (line ``i`` names label ``i``). Names hold no control characters, so
that each stays one line."""

from __future__ import annotations

import unicodedata

CLASSES_FILE = "classes.txt"


def parse_class_names(text: str) -> list[str] | None:
    """``classes.txt`` -> class names in label order (surrounding whitespace and blank lines
    dropped); None when it names none."""
    return [name for name in (line.strip() for line in text.splitlines()) if name] or None


def format_class_names(names) -> str:
    return "".join(f"{name}\n" for name in names)


def has_control_character(name: str) -> bool:
    """Whether ``name`` holds a newline, a tab or another control character: it would not stay
    one line of ``classes.txt`` (a newline would shift every later label)."""
    return any(unicodedata.category(c) == "Cc" for c in name)
