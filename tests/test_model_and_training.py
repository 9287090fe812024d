"""The training path trains the very integer model that codes: QAT and integer inference agree exactly,
and `dicom-nncodec train` runs, logs, resumes and exports loadable weights (a few iterations on generated data)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dicom_nncodec.cli import main
from dicom_nncodec.models import pyramid as P
from dicom_nncodec.models.context_model import ContextModel, PyramidRun
from dicom_nncodec.train.loop import batch_bits
from dicom_nncodec.zoo import read_weights

from .imaging import smooth_image


@pytest.mark.parametrize("use_lstm", [False, True])
def test_qat_and_integer_paths_agree(use_lstm):
    torch.manual_seed(0)
    model = ContextModel(8, use_lstm)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    x = torch.as_tensor(np.stack([smooth_image(40, 44, 12, seed=s, noise=6) for s in range(3)]))
    bits = torch.full((3,), 12)
    for _ in range(5):
        loss = batch_bits(model, x, bits)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.export()
    sizes = P.level_sizes(40, 44)
    levels = P.level_images(x, sizes)
    seen = {}

    def recorder(tag):
        def code_step(phase, level, pred, mask):
            seen.setdefault(tag, []).append((pred.mu4.detach().long(), pred.j.detach().long()))
            orig = P.split_phases(levels[level], sizes[level + 1])[phase]
            return torch.where(mask, orig, pred.rounded_loc.detach().long())
        return code_step

    with torch.no_grad():
        PyramidRun(model, bits, sizes, integer=False).run(levels[-1], recorder("qat"))
        PyramidRun(model, bits, sizes, integer=True).run(levels[-1], recorder("int"))
    for (m1, j1), (m2, j2) in zip(seen["qat"], seen["int"]):
        assert torch.equal(m1, m2) and torch.equal(j1, j2)


def _png_folder(tmp_path):
    """tmp_path/data/cxr with three small 8-bit PNGs: a training root for the train command."""
    data = tmp_path / "data" / "cxr"
    data.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(smooth_image(80, 80, 8, seed=i).astype(np.uint8)).save(data / f"{i}.png")


def test_train_command_runs_resumes_and_exports(tmp_path):
    _png_folder(tmp_path)
    out = tmp_path / "run"
    args = ["train", str(tmp_path / "data"), "--out", str(out), "--iterations", "2", "--batch", "2", "--crop", "32",
            "--width", "4", "--model-id", "test-model"]
    assert main(args) == 0
    log = [json.loads(line) for line in (out / "train.log").read_text().splitlines()]
    assert (out / "checkpoint.pt").exists() and (out / "test-model.nncw").exists()
    resumed = list(args)
    resumed[resumed.index("--iterations") + 1] = "4"
    assert main(resumed + ["--resume"]) == 0
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["iteration"] == 4
    m = read_weights((out / "test-model.nncw").read_bytes())
    assert m.model_id == "test-model" and len(m.digest) == 32
    assert isinstance(log, list)


def test_lossy_train_command_runs_resumes_and_exports(tmp_path):
    _png_folder(tmp_path)
    out = tmp_path / "run"
    args = ["train", str(tmp_path / "data"), "--lossy", "--out", str(out), "--iterations", "2", "--batch", "2",
            "--crop", "32", "--width", "8", "--model-id", "test-lossy", "--threads", "1"]
    assert main(args) == 0
    assert [json.loads(line)["iteration"] for line in (out / "train.log").read_text().splitlines()] == []
    resumed = list(args)
    resumed[resumed.index("--iterations") + 1] = "3"
    assert main(resumed + ["--resume"]) == 0
    assert torch.load(out / "checkpoint.pt", weights_only=False)["iteration"] == 3
    m = read_weights((out / "test-lossy.nncw").read_bytes())
    assert m.model_id == "test-lossy" and m.lossy and m.config["config"]["width"] == 8
