"""Registration with pydicom: decoders, encoders, UID encodings and Dataset defaults.

pydicom 3.0 has no public API to add a coder for a new transfer syntax, so
this inserts into its private registries (pinned to pydicom 3.0.x for that
reason).  ``Dataset.compress``/``decompress`` are wrapped so that, for the
private syntaxes only, the defaults follow the DICOM rules: lossless
compression and any decompression keep the SOP Instance UID; near-lossless
compression gets a new one and the lossy attributes of PS3.3 C.7.6.1.1.5.

JPEG XL (decode all three syntaxes, encode the lossless one) and HTJ2K
(encode the lossless one; pydicom decodes it through pylibjpeg-openjpeg, with
imagecodecs as a second decoder) come from :mod:`dicom_nncodec.standard_plugin`.
"""
from __future__ import annotations

import functools

from pydicom.dataset import Dataset
from pydicom.pixels.decoders.base import _PIXEL_DATA_DECODERS, Decoder
from pydicom.pixels.encoders.base import _PIXEL_DATA_ENCODERS, Encoder

from .syntax import PRIVATE_SYNTAXES, NNCodecLossy, install_standard_uids, install_uid_hook, registered

PLUGIN = "dicom_nncodec"
_done = False


def register() -> None:
    global _done
    if _done:
        return
    install_uid_hook()
    for uid in PRIVATE_SYNTAXES:
        dec = Decoder(uid)
        dec.add_plugin(PLUGIN, ("dicom_nncodec.pydicom_plugin", "_decode_frame"))
        _PIXEL_DATA_DECODERS.setdefault(uid, (dec, "nncodec"))
        enc = Encoder(uid)
        enc.add_plugin(PLUGIN, ("dicom_nncodec.pydicom_plugin", "_encode_frame"))
        _PIXEL_DATA_ENCODERS.setdefault(uid, (enc, "nncodec"))
    _register_standard()
    _wrap_dataset_methods()
    _done = True


STANDARD_PLUGIN = "imagecodecs"


def _standard_plugin():
    from . import standard_plugin
    return standard_plugin


def _register_standard() -> None:
    """JPEG XL and HTJ2K coders from imagecodecs, beside any pydicom already has."""
    SP = _standard_plugin()
    install_standard_uids()
    for uid in SP.JPEG_XL_SYNTAXES + SP.HTJ2K_SYNTAXES:
        dec = _PIXEL_DATA_DECODERS[uid][0] if uid in _PIXEL_DATA_DECODERS else Decoder(uid)
        if STANDARD_PLUGIN not in dec._available and STANDARD_PLUGIN not in dec._unavailable:
            dec.add_plugin(STANDARD_PLUGIN, ("dicom_nncodec.standard_plugin", "_decode_frame"))
        _PIXEL_DATA_DECODERS.setdefault(uid, (dec, "nncodec"))
    for uid in SP.ENCODED_HERE:
        enc = _PIXEL_DATA_ENCODERS[uid][0] if uid in _PIXEL_DATA_ENCODERS else Encoder(uid)
        if STANDARD_PLUGIN not in enc._available and STANDARD_PLUGIN not in enc._unavailable:
            enc.add_plugin(STANDARD_PLUGIN, ("dicom_nncodec.standard_plugin", "_encode_frame"))
        _PIXEL_DATA_ENCODERS.setdefault(uid, (enc, "nncodec"))


_UNSET = object()


def _wrap_dataset_methods() -> None:
    original_compress = Dataset.compress
    original_decompress = Dataset.decompress

    @functools.wraps(original_compress)
    def compress(self, transfer_syntax_uid, arr=None, encoding_plugin="", encapsulate_ext=False, *,
                 generate_instance_uid=_UNSET, **kwargs):
        ts = registered(transfer_syntax_uid)
        if ts is None:
            if generate_instance_uid is not _UNSET:
                kwargs["generate_instance_uid"] = generate_instance_uid
            original_compress(self, transfer_syntax_uid, arr, encoding_plugin, encapsulate_ext, **kwargs)
            if transfer_syntax_uid in _standard_plugin().ENCODED_HERE and int(self.get("SamplesPerPixel", 1)) > 1:
                self.PlanarConfiguration = 0      # (the imagecodecs encoders code colour-by-pixel)
            return None
        from .dataset import apply_lossy_attributes
        from .pixels import PixelFormat
        PixelFormat.from_dataset(self, for_encoding=True).validate()  # a clear refusal before pydicom touches the frames
        lossy = ts == NNCodecLossy
        new_uid = lossy if generate_instance_uid is _UNSET else bool(generate_instance_uid)
        if arr is None and self.original_encoding[1] is False:
            # pydicom hands big-endian frames of a dataset source to encoders unswapped; an array is swapped
            from pydicom.pixels import pixel_array
            arr = pixel_array(self, raw=True)
        original_compress(self, ts, arr, encoding_plugin, encapsulate_ext, generate_instance_uid=False, **kwargs)
        if int(self.get("SamplesPerPixel", 1)) > 1:
            self.PlanarConfiguration = 0      # frames are always coded colour-by-pixel
        if lossy:
            from .dataset import compression_ratio, encoded_frames, lossy_method
            frames = encoded_frames(self)
            apply_lossy_attributes(self, compression_ratio(PixelFormat.from_dataset(self), frames),
                                   lossy_method(frames), new_uid=new_uid)
        elif new_uid:
            from pydicom.uid import generate_uid
            self.SOPInstanceUID = self.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        return None

    @functools.wraps(original_decompress)
    def decompress(self, handler_name="", *, as_rgb=True, generate_instance_uid=_UNSET, **kwargs):
        fm = getattr(self, "file_meta", None)
        ours = fm is not None and registered(fm.get("TransferSyntaxUID", "")) is not None
        if generate_instance_uid is _UNSET:
            generate_instance_uid = not ours
        return original_decompress(self, handler_name, as_rgb=as_rgb, generate_instance_uid=generate_instance_uid,
                                   **kwargs)

    Dataset.compress = compress
    Dataset.decompress = decompress
