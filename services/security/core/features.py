"""Which field of a policy document needs a kernel feature, so a refusal can name it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_HOOK_FIELDS = {"kprobe": "kprobes", "lsm": "lsmhooks", "tracepoint": "tracepoints"}
_ACTION_FEATURES = {"override_return": ("Override",), "send_signal": ("Sigkill", "Signal")}


def feature_field(doc: Mapping[str, Any], feature: str) -> str:
    """The first field path in ``doc`` that needs ``feature`` (``spec`` when none is found)."""
    spec = doc.get("spec") or {}
    if not isinstance(spec, Mapping):
        return "spec"
    hook_field = _HOOK_FIELDS.get(feature)
    if hook_field is not None:
        return f"spec.{hook_field}" + ("[0]" if spec.get(hook_field) else "")
    actions = _ACTION_FEATURES.get(feature, ())
    for hook_field in _HOOK_FIELDS.values():
        hooks = spec.get(hook_field) or []
        for h, hook in enumerate(hooks if isinstance(hooks, list) else []):
            selectors = hook.get("selectors") or [] if isinstance(hook, Mapping) else []
            for s, sel in enumerate(selectors):
                if not isinstance(sel, Mapping):
                    continue
                for a, act in enumerate(sel.get("matchActions") or []):
                    if isinstance(act, Mapping) and act.get("action") in actions:
                        return f"spec.{hook_field}[{h}].selectors[{s}].matchActions[{a}].action"
    return "spec"
