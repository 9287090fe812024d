"""Shipped models, addressed by model id and weights digest.

Why: every bitstream names the model that wrote it (id + SHA-256 of the
weights file), so a file written today decodes with every later release as
long as that weights file keeps shipping.  Weights files are never changed
in place; a new model gets a new id and file, and old ones stay.

Weights file format (``*.nncw``): ``b"NNCW1\\n"``, a little-endian u32 length,
a UTF-8 JSON header (sorted keys: model id, configuration, and for each array
its name, dtype, shape, byte offset), then the raw little-endian arrays.  Only
integers are stored: the exported network and the probability tables.
"""
from __future__ import annotations

import hashlib
import json
import struct
import threading
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from .entropy import TableSet, build_tables
from .errors import ModelNotFound
from .models.context_model import ContextModel
from .models.quant import QConv

MAGIC = b"NNCW1\n"
DEFAULT_LOSSLESS_MODEL = "nnc-lossless-1"
_INTEGER_SUFFIXES = ("w_int", "b_int", "e_int", "_lut", "thresholds")


@dataclass
class LoadedModel:
    model_id: str
    digest: bytes
    config: dict
    net: ContextModel
    tables: TableSet
    lock: threading.Lock


def write_weights(path: Path, model_id: str, net: ContextModel, extra: dict | None = None) -> bytes:
    """Export ``net`` (already ``export()``-ed) and fresh tables; returns the SHA-256 digest."""
    arrays = {}
    for name, buf in net.state_dict().items():
        if name.endswith(_INTEGER_SUFFIXES):
            arrays[name] = buf.detach().cpu().numpy().astype("<i4")
    offsets, freqs = build_tables()
    arrays["tables.offsets"] = offsets.astype("<i8")
    arrays["tables.freqs"] = freqs.astype("<u4")
    header = {"model_id": model_id, "config": {"width": net.width, "use_lstm": net.use_lstm},
              "extra": extra or {}, "arrays": []}
    blob = bytearray()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        header["arrays"].append({"name": name, "dtype": a.dtype.str, "shape": list(a.shape), "offset": len(blob)})
        blob += a.tobytes()
    hj = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    data = MAGIC + struct.pack("<I", len(hj)) + hj + bytes(blob)
    path.write_bytes(data)
    return hashlib.sha256(data).digest()


def read_weights(data: bytes) -> LoadedModel:
    if not data.startswith(MAGIC):
        raise ValueError("not a dicom-nncodec weights file")
    (n,) = struct.unpack_from("<I", data, len(MAGIC))
    start = len(MAGIC) + 4
    header = json.loads(data[start:start + n])
    base = start + n
    arrays = {}
    for a in header["arrays"]:
        dt = np.dtype(a["dtype"])
        count = int(np.prod(a["shape"])) if a["shape"] else 1
        arrays[a["name"]] = np.frombuffer(data, dt, count, base + a["offset"]).reshape(a["shape"])
    cfg = header["config"]
    if set(cfg) != {"width", "use_lstm"}:
        raise ValueError(f"unknown model configuration {cfg}")
    net = ContextModel(width=cfg["width"], use_lstm=cfg["use_lstm"])
    state = net.state_dict()
    needed = {k for k in state if k.endswith(_INTEGER_SUFFIXES)}
    given = {k for k in arrays if not k.startswith("tables.")}
    if needed != given:
        raise ValueError(f"weights file arrays do not match the model: missing {sorted(needed - given)}, "
                         f"unexpected {sorted(given - needed)}")
    for name, arr in arrays.items():
        if arr.dtype.kind not in "iu":
            raise ValueError(f"array {name} has dtype {arr.dtype}; weights files hold integers only")
    offsets, freqs = arrays.get("tables.offsets"), arrays.get("tables.freqs")
    if offsets is None or freqs is None or offsets.ndim != 1 or freqs.ndim != 1 or int(offsets[-1]) != len(freqs):
        raise ValueError("weights file lacks consistent probability tables")
    unknown = set(header) - {"model_id", "config", "extra", "arrays"}
    if unknown:
        raise ValueError(f"unknown weights file header keys {sorted(unknown)}")
    for name in given:
        arr = arrays[name]
        if tuple(arr.shape) != tuple(state[name].shape):
            raise ValueError(f"array {name} has shape {arr.shape}, the model needs {tuple(state[name].shape)}")
        state[name] = torch.from_numpy(arr.astype(np.int64)).to(state[name].dtype)
    net.load_state_dict(state)
    net.eval()
    for m in net.modules():
        if isinstance(m, QConv):     # oneDNN runs these small convolutions about twice as fast channels-last
            m.w_int = m.w_int.contiguous(memory_format=torch.channels_last)
    tables = TableSet(arrays["tables.offsets"].astype(np.int64), arrays["tables.freqs"].astype(np.uint32))
    return LoadedModel(header["model_id"], hashlib.sha256(data).digest(), header, net, tables, threading.Lock())


_cache: dict[tuple[str, bytes | None], LoadedModel] = {}
_cache_lock = threading.Lock()


def default_model() -> str:
    """The model new data is encoded with: ``DICOM_NNCODEC_MODEL`` if set, else the current default.
    (Decoding always uses the model a frame names.)"""
    import os
    return os.environ.get("DICOM_NNCODEC_MODEL") or DEFAULT_LOSSLESS_MODEL


def weights_dir() -> Path:
    return Path(str(resources.files("dicom_nncodec") / "weights"))


def available_models() -> dict[str, Path]:
    return {p.stem: p for p in sorted(weights_dir().glob("*.nncw"))}


def load_model(model_id: str, digest: bytes | None = None) -> LoadedModel:
    """The shipped model ``model_id``; with ``digest``, only if its weights match exactly."""
    key = (model_id, digest)
    with _cache_lock:
        if key in _cache:
            return _cache[key]
        path = available_models().get(model_id)
        if path is None:
            raise ModelNotFound(f"model {model_id!r} is not installed (installed: "
                                f"{', '.join(available_models()) or 'none'})")
        m = read_weights(path.read_bytes())
        if m.model_id != model_id:
            raise ModelNotFound(f"weights file {path.name} holds model {m.model_id!r}, not {model_id!r}")
        if digest is not None and m.digest != digest:
            raise ModelNotFound(f"model {model_id!r} is installed with weights digest {m.digest.hex()[:16]}..., "
                                f"but the data needs {digest.hex()[:16]}...")
        _cache[key] = m
        _cache[(model_id, None)] = m
        return m
