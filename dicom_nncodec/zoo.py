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

import copy
import hashlib
import json
import struct
import threading
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from .errors import ModelNotFound

MAGIC = b"NNCW1\n"
DEFAULT_LOSSLESS_MODEL = "nnc-lossless-2"
NEAR_LOSSLESS_MODEL = "nnc-lossless-1"      # near-lossless (max_error > 0) is coded by the version-1 models
DEFAULT_LOSSY_MODEL = "nnc-lossy-1"
RNN_CONV_KIND = "rnn-conv"
PIXEL_MLP_KIND = "pixel-mlp"
_INTEGER_SUFFIXES = ("w_int", "b_int", "e_int", "_lut", "thresholds")


@dataclass
class LoadedModel:
    """A shipped model as the codec uses it.  Each kind's reader imports its own machinery, so
    loading a version-2 model needs neither torch nor the version-1 entropy coder: its torch
    network (for training, the GPU and the tests) is built on first use of ``net``."""
    model_id: str
    digest: bytes
    config: dict
    network: object | None          # ContextModel | RNNConvCodec | PixelMLPModel; None until built
    tables: object | None           # TableSet | BitTables | None
    lock: threading.Lock
    engine: object | None = None    # EngineWeights of a version-2 model

    @property
    def net(self):
        """The torch network (built here from the engine weights for a version-2 model)."""
        if self.network is None:
            with self.lock:
                if self.network is None:
                    from .models.pixel_mlp import PixelMLPModel
                    net = PixelMLPModel()
                    net.load_engine_arrays(self.engine.arrays)
                    net.eval()
                    self.network = net
        return self.network

    @property
    def format_version(self) -> int:
        """The frame format version this model's frames are written in (2: the compiled engine)."""
        return 2 if self.engine is not None else 1

    @property
    def lossy(self) -> bool:
        """True for the RNN-Conv lossy models, False for the lossless context models."""
        return self.config["config"].get("kind") == RNN_CONV_KIND

    def net_on(self, dev):
        """The network on torch device ``dev``.  Networks are only read during coding (all state lives
        in the coding run), so one copy per device serves every thread."""
        key = str(dev)
        base = self.net
        with self.lock:
            net = self._nets.get(key)
            if net is None:
                net = base if dev.type == "cpu" else copy.deepcopy(base).to(dev)
                self._nets[key] = net
        return net

    def __post_init__(self):
        self._nets = {}


def write_weights(path: Path, model_id: str, net, extra: dict | None = None) -> bytes:
    """Export a version-1 ``ContextModel`` (already ``export()``-ed) and fresh tables; returns the
    SHA-256 digest."""
    from .entropy import build_tables
    arrays = {}
    for name, buf in net.state_dict().items():
        if name.endswith(_INTEGER_SUFFIXES):
            arrays[name] = buf.detach().cpu().numpy().astype("<i4")
    offsets, freqs = build_tables()
    arrays["tables.offsets"] = offsets.astype("<i8")
    arrays["tables.freqs"] = freqs.astype("<u4")
    return _write(path, model_id, {"width": net.width, "use_lstm": net.use_lstm}, arrays, extra)


def _pixel_mlp_config(increment: int, limit: int) -> dict:
    from .engine import kernels as EK
    return {"kind": PIXEL_MLP_KIND, "format_version": 2, "hidden": EK.HIDDEN, "contexts": EK.NC, "tokens": EK.NT,
            "increment": increment, "limit": limit}


def write_engine_weights(path: Path, model_id: str, weights, extra: dict | None = None) -> bytes:
    """Export a version-2 model (``EngineWeights``): its integer MLP weights in the engine's layout
    and the prior counts of the context tables; returns the SHA-256 digest."""
    from .engine.planes import WEIGHT_NAMES
    arrays = {f"engine.{n}": np.asarray(weights.arrays[n]).astype("<i4") for n in WEIGHT_NAMES}
    arrays["tables.prior"] = np.asarray(weights.prior).astype("<i4")
    return _write(path, model_id, _pixel_mlp_config(weights.increment, weights.limit), arrays, extra)


def _engine_shapes() -> dict:
    from .engine import kernels as EK
    return {"w1": (3, EK.HIDDEN, EK.MAX_F), "b1": (3, EK.HIDDEN), "s1": (3, EK.HIDDEN),
            "w2": (3, EK.HIDDEN, EK.HIDDEN), "b2": (3, EK.HIDDEN), "s2": (3, EK.HIDDEN),
            "w3": (3, 2, EK.HIDDEN), "b3": (3, 2), "s3": (3, 2)}


def _check_engine_bounds(eng: dict) -> None:
    """Refuse weights whose integer layers could leave the exact range: int8 weights, shifts within
    [-15, 1], and every partial sum below 2**24 for any admissible input (|input| <= 127), so the
    engine's int32 lanes and the float32 torch path compute the same integers."""
    for layer in ("1", "2", "3"):
        w, b, s = eng["w" + layer], eng["b" + layer], eng["s" + layer]
        if np.abs(w).max() > 127 or s.min() < -15 or s.max() > 1:
            raise ValueError(f"layer {layer}: weights outside int8 or shifts outside [-15, 1]")
        bound = np.abs(w).sum(-1) * 127 + np.abs(b)
        if bound.max() >= 1 << 24:
            raise ValueError(f"layer {layer}: partial sums may reach {int(bound.max())} >= 2**24")


def _read_pixel_mlp(header: dict, arrays: dict, digest: bytes) -> LoadedModel:
    from .engine import kernels as EK
    from .engine.planes import WEIGHT_NAMES, EngineWeights
    shapes = _engine_shapes()
    cfg = header["config"]
    if cfg != _pixel_mlp_config(cfg.get("increment"), cfg.get("limit")) or not (
            type(cfg["increment"]) is int and type(cfg["limit"]) is int
            and 1 <= cfg["increment"] <= 1 << 10 and 1 << 8 <= cfg["limit"] <= 1 << 24):
        raise ValueError(f"unknown pixel-MLP configuration {cfg}")
    want = {f"engine.{n}" for n in WEIGHT_NAMES} | {"tables.prior"}
    if set(arrays) != want:
        raise ValueError(f"weights file arrays do not match the model: missing {sorted(want - set(arrays))}, "
                         f"unexpected {sorted(set(arrays) - want)}")
    eng = {}
    for n in WEIGHT_NAMES:
        a = arrays[f"engine.{n}"]
        if a.dtype.kind not in "iu" or tuple(a.shape) != shapes[n]:
            raise ValueError(f"array engine.{n} has dtype {a.dtype} and shape {a.shape}; the model needs "
                             f"integers {shapes[n]}")
        eng[n] = np.ascontiguousarray(a, dtype=np.int64)
    _check_engine_bounds(eng)
    prior = arrays["tables.prior"]
    if prior.dtype.kind not in "iu" or prior.shape != (EK.NC, EK.NT) or int(prior.min()) < 1:
        raise ValueError("weights file has prior counts of the wrong dtype or shape, or a count below 1")
    weights = EngineWeights(eng, np.ascontiguousarray(prior, dtype=np.int64), cfg["increment"], cfg["limit"])
    return LoadedModel(header["model_id"], digest, header, None, None, threading.Lock(), weights)


def _rnnconv_config(width: int) -> dict:
    from .models import rnnconv as RC
    return {"kind": RNN_CONV_KIND, "width": width, "block": RC.BLOCK, "bits_per_block": RC.BITS_PER_BLOCK,
            "iterations": RC.ITERATIONS, "gain_shift": list(RC.GAIN_SHIFT), "recon_frac": RC.RECON_FRAC,
            "out_frac": RC.OUT_FRAC}


def write_lossy_weights(path: Path, model_id: str, net, bit_probs: np.ndarray,
                        extra: dict | None = None) -> bytes:
    """Export an RNN-Conv model (decoder ``export()``-ed): the decoder as integers, the encoder
    as float32 (it only chooses codes, so it need not be exact), and the code probabilities."""
    arrays = {}
    for name, buf in net.state_dict().items():
        if name.startswith("decoder.") and name.endswith(_INTEGER_SUFFIXES):
            arrays[name] = buf.detach().cpu().numpy().astype("<i4")
        elif name.startswith("encoder."):
            arrays[name] = buf.detach().cpu().numpy().astype("<f4")
    arrays["tables.bit_probs"] = np.asarray(bit_probs).astype("<i4")
    return _write(path, model_id, _rnnconv_config(net.width), arrays, extra)


def _write(path: Path, model_id: str, config: dict, arrays: dict, extra: dict | None) -> bytes:
    header = {"model_id": model_id, "config": config, "extra": extra or {}, "arrays": []}
    blob = bytearray()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        header["arrays"].append({"name": name, "dtype": a.dtype.str, "shape": list(a.shape), "offset": len(blob)})
        blob += a.tobytes()
    hj = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    data = MAGIC + struct.pack("<I", len(hj)) + hj + bytes(blob)
    path.write_bytes(data)
    return hashlib.sha256(data).digest()


def _read_lossy(header: dict, arrays: dict, digest: bytes) -> LoadedModel:
    import torch
    from .entropy import BitTables
    from .models import rnnconv as RC
    from .models.rnnconv import RNNConvCodec
    cfg = header["config"]
    if cfg != _rnnconv_config(cfg.get("width", 0)):
        raise ValueError(f"unknown RNN-Conv configuration {cfg} (this release codes {_rnnconv_config(cfg.get('width'))})")
    net = RNNConvCodec(cfg["width"])
    state = net.state_dict()
    needed = {k for k in state if (k.startswith("decoder.") and k.endswith(_INTEGER_SUFFIXES))
              or k.startswith("encoder.")}
    given = {k for k in arrays if not k.startswith("tables.")}
    if needed != given or set(arrays) - given != {"tables.bit_probs"}:
        raise ValueError(f"weights file arrays do not match the model: missing {sorted(needed - given)}, "
                         f"unexpected {sorted(given - needed)}")
    for name in given:
        arr = arrays[name]
        want = "f" if name.startswith("encoder.") else "iu"
        if arr.dtype.kind not in want or tuple(arr.shape) != tuple(state[name].shape):
            raise ValueError(f"array {name} has dtype {arr.dtype} and shape {arr.shape}; the model needs "
                             f"{'float' if want == 'f' else 'integer'} {tuple(state[name].shape)}")
        state[name] = torch.from_numpy(np.array(arr)).to(state[name].dtype)
    net.load_state_dict(state)
    net.eval()
    probs = arrays["tables.bit_probs"]
    if probs.dtype.kind not in "iu" or probs.shape != (RC.ITERATIONS * RC.BITS_PER_BLOCK * 3,):
        raise ValueError("weights file has bit probabilities of the wrong dtype or shape")
    return LoadedModel(header["model_id"], digest, header, net, BitTables(probs.astype(np.int64)),
                       threading.Lock())


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
    unknown = set(header) - {"model_id", "config", "extra", "arrays"}
    if unknown:
        raise ValueError(f"unknown weights file header keys {sorted(unknown)}")
    cfg = header["config"]
    if cfg.get("kind") == RNN_CONV_KIND:
        return _read_lossy(header, arrays, hashlib.sha256(data).digest())
    if cfg.get("kind") == PIXEL_MLP_KIND:
        return _read_pixel_mlp(header, arrays, hashlib.sha256(data).digest())
    if set(cfg) != {"width", "use_lstm"}:
        raise ValueError(f"unknown model configuration {cfg}")
    return _read_context_model(header, arrays, hashlib.sha256(data).digest())


def _read_context_model(header: dict, arrays: dict, digest: bytes) -> LoadedModel:
    """A version-1 lossless / near-lossless model: the ConvLSTM context network and its tables."""
    import torch
    from .entropy import TableSet
    from .models.context_model import ContextModel
    from .models.quant import QConv
    cfg = header["config"]
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
    return LoadedModel(header["model_id"], digest, header, net, tables, threading.Lock())


_cache: dict[tuple[str, bytes | None], LoadedModel] = {}
_cache_lock = threading.Lock()


def default_model() -> str:
    """The model new data is encoded with: ``DICOM_NNCODEC_MODEL`` if set, else the current default.
    (Decoding always uses the model a frame names.)"""
    import os
    return os.environ.get("DICOM_NNCODEC_MODEL") or DEFAULT_LOSSLESS_MODEL


def default_lossy_model() -> str:
    """The RNN-Conv model ``ratio=`` encodes with: ``DICOM_NNCODEC_LOSSY_MODEL`` if set, else the default."""
    import os
    return os.environ.get("DICOM_NNCODEC_LOSSY_MODEL") or DEFAULT_LOSSY_MODEL


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
