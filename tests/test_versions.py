"""The import-time check names a library whose installed version is outside difftrain's ranges."""

from __future__ import annotations

from importlib import metadata

import pytest

from difftrain.versions import VersionError, check_installed_versions


def test_installed_set_passes(monkeypatch):
    monkeypatch.delenv("DIFFTRAIN_SKIP_VERSION_CHECK", raising=False)  # checked even where imports skipped it
    check_installed_versions()  # the suite runs on the lock: it must be inside the ranges


def test_a_version_outside_the_range_is_named(monkeypatch):
    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "5.99.0" if name == "transformers" else real(name))
    monkeypatch.delenv("DIFFTRAIN_SKIP_VERSION_CHECK", raising=False)
    with pytest.raises(VersionError, match=r"transformers 5\.99\.0 is installed; difftrain works with .*<5\.24"):
        check_installed_versions()
    monkeypatch.setenv("DIFFTRAIN_SKIP_VERSION_CHECK", "1")
    check_installed_versions()
