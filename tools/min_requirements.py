"""Print `package==floor` for the dependencies whose declared minimum `make test-min` installs and tests.

The floors are read from pyproject.toml's `dependencies`, so the versions tested are the versions declared:

    $ python tools/min_requirements.py
    transformers==5.0
    accelerate==1.2
    peft==0.15

Runs on any Python >= 3.10 with nothing installed (tomllib is 3.11+, so the list is read with a pattern).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

PACKAGES = ("transformers", "accelerate", "peft")


def min_requirements(pyproject: str) -> list[str]:
    """`name==floor` for each of PACKAGES, from the `name>=floor` entries of the dependencies list."""
    dependencies = re.search(r"^dependencies = \[(.*?)^\]", pyproject, re.S | re.M)
    if dependencies is None:
        raise ValueError("pyproject.toml: no dependencies list")
    pins = []
    for name in PACKAGES:
        floor = re.search(rf'"{re.escape(name)}\s*>=\s*([^,;"\s]+)', dependencies.group(1))
        if floor is None:
            raise ValueError(f"pyproject.toml: dependency {name!r} has no '>=' floor")
        pins.append(f"{name}=={floor.group(1)}")
    return pins


if __name__ == "__main__":
    try:
        print("\n".join(min_requirements((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())))
    except ValueError as e:
        sys.exit(f"error: {e}")
