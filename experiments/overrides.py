"""``--set FIELD=VALUE`` on the command line of the experiments: one field of a plan (a dataclass) at a time."""

from __future__ import annotations

import argparse
import dataclasses
import json


def apply_overrides(plan, items: list[str], parser: argparse.ArgumentParser):
    """``plan`` with each ``FIELD=VALUE`` applied; VALUE is JSON (``800``, ``[0,1,2]``, ``{"lr": 1e-3}``) or a bare
    string. Lists become tuples; an integer given for a float field becomes a float. Unknown fields are refused."""
    fields = [f.name for f in dataclasses.fields(plan)]
    for item in items:
        name, _, value = item.partition("=")
        if name not in fields or not value:
            parser.error(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {', '.join(fields)}")
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = value
        current = getattr(plan, name)
        if isinstance(parsed, list):
            parsed = tuple(parsed)
        elif isinstance(current, float) and isinstance(parsed, int) and not isinstance(parsed, bool):
            parsed = float(parsed)
        if current is not None and type(parsed) is not type(current):
            parser.error(f"--set {item!r}: {name} is a {type(current).__name__}, {value!r} is not")
        plan = dataclasses.replace(plan, **{name: parsed})
    return plan
