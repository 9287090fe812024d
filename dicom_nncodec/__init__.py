"""dicom-nncodec: a learned lossless / near-lossless image codec for DICOM.

``import dicom_nncodec`` registers the two private transfer syntaxes with
pydicom as pixel-data decoder and encoder, so that ``dcmread(f).pixel_array``,
``pydicom.pixels.pixel_array(path)``, ``iter_pixels``, ``ds.decompress()`` and
``ds.compress(dicom_nncodec.NNCodecLossless)`` work.
"""
from __future__ import annotations

from .errors import BitstreamError, ModelNotFound, NNCodecError, UnsupportedPixelData
from .syntax import (IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, LOSSY_METHOD, PRIVATE_SYNTAXES,
                     NNCodecLossless, NNCodecLossy, fix_association, fix_transfer_syntax, registered)
from ._register import register as _register
from . import dataset
from .dataset import compress, decompress

__version__ = "1.0.0"

_register()

__all__ = ["NNCodecLossless", "NNCodecLossy", "BitstreamError", "UnsupportedPixelData", "ModelNotFound",
           "NNCodecError", "compress", "decompress", "dataset", "fix_transfer_syntax", "fix_association", "registered",
           "PRIVATE_SYNTAXES",
           "IMPLEMENTATION_CLASS_UID", "IMPLEMENTATION_VERSION_NAME", "LOSSY_METHOD", "__version__"]
