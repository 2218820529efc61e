"""Text people read: which characters may not stand in it, and how they are written out.

One rule for what operators type (refused), what agents report (written out) and what
``cpctl`` prints (written out): control characters other than tab (an escape sequence
can retitle a terminal, clear it or fake output; C1's CSI acts like ESC [) and Unicode's
bidirectional controls (text could read backwards or hide what follows). Standard
library only: ``cpctl`` imports it.
"""

from __future__ import annotations

import unicodedata

__all__ = ["BIDI_CONTROLS", "escaped", "refused_char", "visible"]

BIDI_CONTROLS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)


def refused_char(c: str) -> str | None:
    """Why ``c`` may not stand in text people read (None: it may)."""
    if c in BIDI_CONTROLS:
        return "bidirectional control characters"
    if c != "\t" and unicodedata.category(c) == "Cc":  # C0, DEL and C1
        return "control characters"
    return None


def escaped(text: str, keep: str = "") -> str:
    """``text`` with each refused character but those in ``keep`` written as a ``\\u``
    escape (``\\u001b``)."""
    if text.isprintable():
        return text
    return "".join(
        f"\\u{ord(c):04x}" if c not in keep and refused_char(c) is not None else c for c in text
    )


def visible(text: str) -> bool:
    """Whether ``text`` shows anything: not only spaces and invisible format characters."""
    return any(unicodedata.category(c)[0] not in "ZC" for c in text)
