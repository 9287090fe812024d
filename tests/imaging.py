"""Generated test images and datasets."""
from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid


def smooth_image(rows, cols, bits, signed=False, seed=0, noise=3.0, samples=1):
    """A plausible image: smooth structure plus noise, using the full range of ``bits``."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols]
    base = np.sin(x / max(cols, 1) * 6.0) + np.cos(y / max(rows, 1) * 4.0) + ((x // 7 + y // 5) % 3) * 0.3
    base = (base - base.min()) / max(float(np.ptp(base)), 1e-9)
    hi = (1 << bits) - 1
    shape = (rows, cols) if samples == 1 else (rows, cols, samples)
    if samples > 1:
        base = base[..., None] * np.array([1.0, 0.8, 0.6])
    v = np.clip(np.round(base * hi + rng.normal(0, noise, shape)), 0, hi).astype(np.int64)
    if signed:
        v -= 1 << (bits - 1)
    return v


def make_dataset(frames, bits_allocated, bits_stored, signed=False, photometric="MONOCHROME2", samples=1):
    """An Explicit VR Little Endian Secondary Capture dataset holding ``frames`` (N, rows, cols[, 3])."""
    frames = np.asarray(frames)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    uid = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.PatientID = "TEST"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.Rows, ds.Columns = frames.shape[1], frames.shape[2]
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = photometric
    if samples > 1:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits_allocated, bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(signed)
    if len(frames) > 1:
        ds.NumberOfFrames = len(frames)
    if photometric == "PALETTE COLOR":
        n = 1 << bits_stored
        ds.RedPaletteColorLookupTableDescriptor = [n if n < 65536 else 0, 0, 16]
        ds.GreenPaletteColorLookupTableDescriptor = [n if n < 65536 else 0, 0, 16]
        ds.BluePaletteColorLookupTableDescriptor = [n if n < 65536 else 0, 0, 16]
        lut = (np.arange(n) * (65535 // max(n - 1, 1))).astype("<u2").tobytes()
        ds.RedPaletteColorLookupTableData = ds.GreenPaletteColorLookupTableData = lut
        ds.BluePaletteColorLookupTableData = lut
    dtype = f"<{'i' if signed else 'u'}{bits_allocated // 8}"
    ds.PixelData = frames.astype(dtype).tobytes()
    ds["PixelData"].VR = "OW" if bits_allocated > 8 else "OB"
    return ds
