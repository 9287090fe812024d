"""What both trainers share: the run folder and the learning-rate schedule.

A run folder holds ``data.json`` (the configuration and the training data
actually read), ``train.log`` (one JSON line every ``log_every``
iterations) and ``checkpoint.pt`` (model, optimiser, sampler and torch RNG
states and the iteration, replaced atomically), so ``--resume`` continues a
stopped run exactly where it stopped.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def cosine_lr(base: float, iteration: int, total: int) -> float:
    """Cosine decay from ``base`` to 5 % of it over ``total`` iterations."""
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * iteration / total)))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


class RunFolder:
    def __init__(self, cfg, data_description: dict):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "data.json").write_text(json.dumps({"config": asdict(cfg), "data": data_description}, indent=1))
        self.ckpt = self.out / "checkpoint.pt"
        self._log = open(self.out / "train.log", "a")

    def resume(self, model, opt, sampler) -> int:
        """Restore the checkpoint if there is one; returns the iteration to start from."""
        if not self.ckpt.exists():
            return 0
        state = torch.load(self.ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sampler.restore(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        return state["iteration"]

    def checkpoint(self, model, opt, sampler, iteration: int) -> None:
        tmp = self.ckpt.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sampler": sampler.state(),
                    "torch_rng": torch.get_rng_state(), "iteration": iteration, "config": asdict(self.cfg)}, tmp)
        tmp.replace(self.ckpt)

    def log(self, line: dict) -> None:
        self._log.write(json.dumps(line) + "\n")
        self._log.flush()
        log.info("%s", line)

    def close(self) -> None:
        self._log.close()
