"""Fixtures shared by the hand-built netns pod tests."""

from __future__ import annotations

import pytest

from common.ca import CertificateAuthority


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    """One mesh CA per test module (generating a key is the slow part)."""
    return CertificateAuthority.generate("cluster.local")
