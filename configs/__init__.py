"""The packaged grid YAMLs (`tokenscale.configs`): `demo.yaml` (what `tokenscale demo`
runs) and `paper.yaml`, shipped inside the wheel so that a non-editable install finds them.

`grid_path("demo")` is how the CLI turns a GRID argument into a file: an existing path is
used as given, anything else must name a packaged grid.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

SUFFIXES = (".yaml", ".yml")


def _files():
    return resources.files(__name__)


def packaged_grids() -> list[str]:
    """Names of the grids shipped with the package (`demo`, `paper`, ...)."""
    return sorted(
        entry.name.rsplit(".", 1)[0]
        for entry in _files().iterdir()
        if entry.is_file() and entry.name.endswith(SUFFIXES)
    )


def grid_path(name_or_path: str | Path) -> Path:
    """The grid YAML for `name_or_path`: an existing file as is, else a packaged grid named
    `demo` or `demo.yaml`. Raises ValueError naming the packaged grids otherwise."""
    given = str(name_or_path)
    path = Path(given).expanduser()
    if path.is_file():
        return path
    if given and "/" not in given and "\\" not in given:
        stem = next((given[: -len(s)] for s in SUFFIXES if given.endswith(s)), given)
        for candidate in (f"{stem}{s}" for s in SUFFIXES):
            entry = _files().joinpath(candidate)
            if entry.is_file():
                # an installed package lives in a directory, so this is a real file path
                return Path(str(entry))
    raise ValueError(
        f"{given!r} is neither a grid file nor a packaged grid: give the path of a grid YAML "
        f"or one of the packaged grids ({', '.join(packaged_grids())})"
    )
