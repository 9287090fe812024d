"""The exceptions a caller of the codec can meet, one type per kind of problem."""


class NNCodecError(Exception):
    """Base class of every error raised by dicom_nncodec."""


class BitstreamError(NNCodecError, ValueError):
    """A frame cannot be decoded: corrupt, truncated or foreign data, an unknown
    model, or a newer format version.  The message names the cause.  The codec
    raises this instead of ever returning wrong pixels."""


class UnsupportedPixelData(NNCodecError, ValueError):
    """The pixel description is outside what the codec supports (float, 32-bit,
    1-bit, unsupported photometric interpretation, ...).  The message says which
    attribute and why."""


class ModelNotFound(BitstreamError):
    """The bitstream names a model (id and weights digest) that is not installed."""
