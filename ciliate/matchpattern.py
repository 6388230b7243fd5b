"""DNS names and Cilium's ``matchName`` / ``matchPattern`` (``rules.dns`` and ``toFQDNs``).

Shared by the policy resources (validation), the policy compiler (toFQDNs selectors) and the
node's DNS proxy (rules.dns), so all three agree on one meaning:

- names compare lower-cased and dot-terminated (``Example.COM`` == ``example.com.``);
- ``matchName`` is one exact name; characters ``[-a-zA-Z0-9_.]``;
- ``matchPattern``: ``*`` is any run (possibly empty) of ``[-a-zA-Z0-9_]`` *within one label*
  (``*.example.com`` matches ``a.example.com`` and ``.example.com`` is never a name, so not
  ``example.com``; it never matches ``a.b.example.com``); ``*`` alone matches every name,
  including the root. Characters ``[-a-zA-Z0-9_.*]``. ``**`` is refused (older Cilium's rule;
  the multi-label ``**.`` form of Cilium 1.17 is not implemented).
"""

from __future__ import annotations

import re
from functools import lru_cache

DNS_CHARS = "[-a-zA-Z0-9_]"
MAX_NAME = 255

_NAME_CHARS = re.compile(r"[-a-zA-Z0-9_.]+")
_PATTERN_CHARS = re.compile(r"[-a-zA-Z0-9_.*]+")
MATCH_ALL = re.compile(rf"(?:{DNS_CHARS}+\.)+|\.")


def normalize_name(name: str) -> str:
    """Lower case, exactly one trailing dot (``"."`` for the root)."""
    return name.strip().lower().rstrip(".") + "."


def check_match_name(value: str) -> str:
    """Raise ValueError naming what is wrong with a ``matchName``; return it normalized."""
    text = value.strip()
    if not text:
        raise ValueError("matchName must not be empty")
    if not _NAME_CHARS.fullmatch(text):
        raise ValueError(
            f"invalid characters in matchName {value!r}: only a-z, A-Z, 0-9, '-', '_' and '.'"
        )
    if ".." in text or text.startswith("."):
        raise ValueError(f"matchName {value!r} has an empty label")
    if len(text) > MAX_NAME:
        raise ValueError(f"matchName is longer than {MAX_NAME} characters")
    return text


def check_match_pattern(value: str) -> str:
    """Raise ValueError naming what is wrong with a ``matchPattern``; return it as given."""
    text = value.strip()
    if not text:
        raise ValueError("matchPattern must not be empty")
    if not _PATTERN_CHARS.fullmatch(text):
        raise ValueError(
            f"invalid characters in matchPattern {value!r}: only a-z, A-Z, 0-9, '-', '_', '.'"
            " and '*'"
        )
    if "**" in text:
        raise ValueError(f"'**' is not allowed in matchPattern {value!r}")
    if ".." in text or (text.startswith(".") and text != "."):
        raise ValueError(f"matchPattern {value!r} has an empty label")
    if len(text) > MAX_NAME:
        raise ValueError(f"matchPattern is longer than {MAX_NAME} characters")
    return text


@lru_cache(maxsize=4096)
def pattern_regex(pattern: str) -> re.Pattern[str]:
    """The regex a pattern means, to ``fullmatch`` against :func:`normalize_name` output."""
    norm = normalize_name(pattern)
    if norm == "*.":
        return MATCH_ALL
    return re.compile("".join(f"{DNS_CHARS}*" if c == "*" else re.escape(c) for c in norm))


def name_matches(match_name: str, name: str) -> bool:
    return normalize_name(match_name) == normalize_name(name)


def pattern_matches(pattern: str, name: str) -> bool:
    return pattern_regex(pattern).fullmatch(normalize_name(name)) is not None
