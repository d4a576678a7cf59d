"""Requirement lines for an image, read from pyproject.toml (used by the Dockerfiles).

    python3 deploy/image_requirements.py build PYPROJECT      # [build-system] requires
    python3 deploy/image_requirements.py extra NAME PYPROJECT # dependencies + extra NAME

The images install these first, pinned by deploy/constraints.txt, in a layer that only
changes when the list does; the project's own wheel (built with --no-deps) comes after.
An extra that names the project itself (`lipsync-serving[inference]`) is expanded.
Standard library only: it runs on the bare base image.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?\s*(.*)$")


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def extra_requirements(project: dict, extra: str) -> list[str]:
    """`dependencies` plus those of `extra`, self-references expanded, order kept."""
    me = _normalize(project["name"])
    extras = project.get("optional-dependencies", {})
    out: list[str] = []
    seen_extras: set[str] = set()

    def add(reqs: list[str]) -> None:
        for req in reqs:
            m = _NAME.match(req)
            if m and _normalize(m.group(1)) == me:
                for name in (m.group(2) or "").split(","):
                    if name.strip():
                        add_extra(name.strip())
            elif req not in out:
                out.append(req)

    def add_extra(name: str) -> None:
        if name in seen_extras:
            return
        if name not in extras:
            raise SystemExit(f"pyproject.toml has no extra {name!r} (it has {sorted(extras)})")
        seen_extras.add(name)
        add(extras[name])

    add(project.get("dependencies", []))
    add_extra(extra)
    return out


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "build":
        data = tomllib.loads(Path(argv[1]).read_text())
        reqs = data["build-system"]["requires"]
    elif len(argv) == 3 and argv[0] == "extra":
        data = tomllib.loads(Path(argv[2]).read_text())
        reqs = extra_requirements(data["project"], argv[1])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    print("\n".join(reqs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
