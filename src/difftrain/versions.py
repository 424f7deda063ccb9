"""At import: are the installed libraries inside the ranges difftrain was tested with?

pip enforces the ranges in pyproject.toml when it installs difftrain, but not later
(`pip install -U transformers`, `--no-deps`, a conda environment); a version outside them
fails somewhere deep inside a library. This reads difftrain's own declared requirements,
so the ranges live in one place. DIFFTRAIN_SKIP_VERSION_CHECK=1 skips it (`make
test-latest` runs the suite on the newest releases on purpose).
"""

from __future__ import annotations

import os
from importlib import metadata

from difftrain.errors import DifftrainError


class VersionError(DifftrainError, ImportError):
    pass


def check_installed_versions() -> None:
    if os.environ.get("DIFFTRAIN_SKIP_VERSION_CHECK"):
        return
    try:
        requirements = metadata.requires("difftrain") or []
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return
    from packaging.requirements import Requirement

    problems = []
    for line in requirements:
        requirement = Requirement(line)
        optional = requirement.marker is not None and not requirement.marker.evaluate({"extra": ""})
        if optional and not any(requirement.marker.evaluate({"extra": extra}) for extra in ("eval", "onnx", "data", "deepspeed")):
            continue  # the dev extra, or another platform's requirement
        try:
            installed = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            if not optional:  # a missing extra is reported by the command that needs it
                problems.append(f"{requirement.name} is not installed (difftrain needs {requirement.specifier})")
            continue
        if not requirement.specifier.contains(installed, prereleases=True):
            problems.append(f"{requirement.name} {installed} is installed; difftrain works with {requirement.specifier}")
    if problems:
        raise VersionError(
            "difftrain cannot run with the installed libraries:\n  " + "\n  ".join(problems)
            + "\nInstall the tested set: pip install -r requirements.lock (from the difftrain repository), "
            "or pip install the versions named above."
        )


def difftrain_version() -> str:
    """This package's installed version ("unknown" when run from a tree that was never installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("difftrain")
    except PackageNotFoundError:
        return "unknown"
