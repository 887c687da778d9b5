"""Strict JSON: NaN and ±infinity become null. Python's ``json`` writes them as
bare ``NaN`` / ``Infinity``, which strict parsers (JavaScript, jq, Go, Java)
refuse; a metric that could not be computed (a gate on one class) is "no
value", which JSON spells null. Every JSON deltarec prints or stores goes
through :func:`dumps`."""
from __future__ import annotations

import json
import math
from typing import Any


def finite(obj: Any) -> Any:
    """``obj`` with every non-finite float (numpy's included) replaced by None,
    through dicts, lists and tuples."""
    if isinstance(obj, float) or (hasattr(obj, "dtype") and getattr(obj, "ndim", 1) == 0
                                  and getattr(obj.dtype, "kind", "") == "f"):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` that writes null for NaN and ±infinity and never a bare NaN."""
    return json.dumps(finite(obj), allow_nan=False, **kwargs)
