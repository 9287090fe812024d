"""Shared fixtures.  Tests use pydicom's bundled files, the pydicom-data package and generated
images only; nothing from outside the installed packages."""
from __future__ import annotations

import pytest
import torch

import dicom_nncodec  # noqa: F401  (registers the transfer syntaxes)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


