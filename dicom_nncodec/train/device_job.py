"""One job for a lent GPU machine: train version-2 models from a crop file, check the integer
network on CUDA against the compiled CPU engine, and time both.

Run as a file (``python dicom_nncodec/train/device_job.py CROPS OUT``), not as a module: the GPU
machine has torch, numpy and numba but not pydicom, so the package's ``__init__`` (which
registers the pydicom plugin) is bypassed and only the torch/numba modules are imported.

Several configurations train at once in separate processes (the per-pixel model is far too
small to fill the GPU alone); each writes ``OUT/<name>/engine.npz`` and its log.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _bare_package():
    """Import ``dicom_nncodec`` submodules without running the package ``__init__``."""
    if "dicom_nncodec" not in sys.modules:
        pkg = types.ModuleType("dicom_nncodec")
        pkg.__path__ = [str(ROOT / "dicom_nncodec")]
        sys.modules["dicom_nncodec"] = pkg
    sys.path.insert(0, str(ROOT))


CONFIGS = {
    "a": {"lr": 3e-3, "batch": 64, "seed": 1},
    "b": {"lr": 6e-3, "batch": 128, "seed": 2},
    "c": {"lr": 2e-3, "batch": 256, "seed": 3},
}


def train_one(crops: str, out: str, name: str, minutes: float):
    _bare_package()
    import torch
    from dicom_nncodec.train.pixel_train import train
    cfg = CONFIGS[name]
    train(crops, str(Path(out) / name), iterations=200000, minutes=minutes, batch=cfg["batch"], lr=cfg["lr"],
          seed=cfg["seed"], device="cuda" if torch.cuda.is_available() else "cpu", checkpoint_every=1000, log_every=200)


def check_and_time(crops: str, out: str):
    """CUDA integer network == CPU engine on crops and on synthetic 512x512 slices; throughput."""
    _bare_package()
    import numpy as np
    import torch
    from dicom_nncodec.engine import kernels as K
    from dicom_nncodec.engine import planes as EP
    from dicom_nncodec.models.pixel_mlp import PixelMLPModel

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    report = {"device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu"}
    data = np.load(crops)
    rng = np.random.default_rng(0)
    for name in CONFIGS:
        f = Path(out) / name / "engine.npz"
        if not f.exists():
            continue
        a = dict(np.load(f))
        m = PixelMLPModel()
        m.load_engine_arrays(a)
        mc = PixelMLPModel().to(dev)
        mc.load_engine_arrays(a)
        args = tuple(a[n] for n in EP.WEIGHT_NAMES)
        mism = 0
        checked = 0
        for i in rng.integers(0, len(data["crops"]), 16):
            X = data["crops"][i].astype(np.int64)
            b = int(data["bits"][i])
            for ph in range(3):
                for level in (0, 2, 5):
                    mu, j = K.phase_predictions(X, ph, level, b, *args)
                    tm, tj = mc.predict_int(torch.as_tensor(X, device=dev)[None], ph, level,
                                              torch.tensor([b], device=dev))
                    ok = np.array_equal(mu, tm[0].cpu().numpy()) and np.array_equal(j, tj[0].cpu().numpy())
                    mism += not ok
                    checked += 1
        # a 200-slice 512x512 16-bit series: network throughput on CUDA, finest level D phase x3 phases
        nsl = 200 if dev == "cuda" else 4
        series = torch.as_tensor(rng.integers(0, 1 << 12, (nsl, 512, 512)) + 1000, device=dev)
        bits = torch.full((nsl,), 16, device=dev)
        sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
        sync()
        t = time.time()
        with torch.no_grad():
            for ph in range(3):
                for chunk in range(0, nsl, 50):
                    mu, j = mc.predict_int(series[chunk:chunk + 50], ph, 0, bits[chunk:chunk + 50])
        sync()
        dt = time.time() - t
        # CPU engine on the same machine, one slice, for comparison
        w = EP.EngineWeights(a, EP.parametric_prior(), 32, 1 << 16)
        sl = series[0].cpu().numpy()
        EP.encode_plane(sl[:64, :64], 16, w)
        t = time.time()
        pay = EP.encode_plane(sl, 16, w)
        te = time.time() - t
        t = time.time()
        dec = EP.decode_plane(pay, 512, 512, 16, w)
        td = time.time() - t
        report[name] = {"device_vs_cpu_engine_mismatching_steps": mism, "steps_checked": checked,
                        "network_finest_level_slices": nsl, "network_finest_level_s": round(dt, 3),
                        "network_MBps_finest_level": round(nsl * 512 * 512 * 2 * 0.75 / dt / 1e6, 1),
                        "cpu_engine_encode_ms": round(te * 1e3, 1), "cpu_engine_decode_ms": round(td * 1e3, 1),
                        "cpu_roundtrip_exact": bool(np.array_equal(dec, sl))}
    Path(out, "report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


def main():
    crops, out, minutes = sys.argv[1], sys.argv[2], float(sys.argv[3])
    Path(out).mkdir(parents=True, exist_ok=True)
    procs = []
    for name in CONFIGS:
        log = open(Path(out) / f"{name}.out", "w")
        procs.append(subprocess.Popen([sys.executable, __file__, "--train", crops, out, name, str(minutes)],
                                      stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="4")))
    for p in procs:
        p.wait()
    check_and_time(crops, out)


if __name__ == "__main__":
    if sys.argv[1] == "--train":
        train_one(sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5]))
    elif sys.argv[1] == "--check":
        check_and_time(sys.argv[2], sys.argv[3])
    else:
        main()
