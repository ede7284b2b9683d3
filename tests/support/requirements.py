"""What a test needs from the machine. Outside CI a missing tool skips the test, saying why; in CI
(``CI=true``) it fails it: CI installs everything the suite needs (.ci/run), so a missing tool
there is a defect of the set-up, not a reason to pass quietly."""

from __future__ import annotations

import os

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def missing(reason: str) -> None:
    """Skip (or, in CI, fail) the calling test: something it needs is not on this machine."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: .ci/run must install it)", pytrace=False)
    pytest.skip(reason)
