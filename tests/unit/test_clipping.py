"""Gradient value clipping against a hand-worked two-micro-step example (torch engine).

Model: ``pred = w · x`` with ``w0 = (0.5, -0.25)``, loss ``(pred - t)^2``, gradient ``2 (w·x - t) x``;
two micro-batches per optimiser step (``A = 2``), clip value 1, the engine back-propagates
``loss × loss.scale / A``.

* micro-step 1: ``x = (2, 1)``, ``t = 0``: residual 0.75, gradient ``(3, 1.5)``; contribution ``s (1.5, 0.75)``.
* micro-step 2: ``x = (2, -0.5)``, ``t = 2.125``: residual -1, gradient ``(-4, 1)``; contribution ``s (-2, 0.5)``.

``accumulated`` (reference): ``clamp(clamp(c1) + c2)``; ``per_micro_batch``: ``clamp(c1) + clamp(c2)``.
Adam's first step with no weight decay moves each weight by ``-lr · g / (|g| + eps)``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pertadapt.config.components import AdaptiveLoss
from pertadapt.config.schema import ConfigError, OptimConfig, RunConfig
from pertadapt.train.engine import TorchEngine

LR, EPS = 0.1, 1e-8
MICRO = [((2.0, 1.0), 0.0), ((2.0, -0.5), 2.125)]


class _Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.5, -0.25], dtype=torch.float64))


def _run(mode: str, scale: float, clip: float | None = 1.0) -> tuple[list[list[float]], list[float]]:
    """The gradient after each micro-step's backward and the weights after the optimiser step."""
    cfg = RunConfig(optim=OptimConfig(lr=LR, weight_decay=0.0, batch_size=2, micro_batch_size=1, clip_value=clip,
                                      clip_mode=mode), loss=AdaptiveLoss(scale=scale))
    model = _Linear()
    engine = TorchEngine(model, cfg, torch.device("cpu"))
    grads = []
    for x, t in MICRO:
        loss = (model.w @ torch.tensor(x, dtype=torch.float64) - t) ** 2
        engine.backward(loss)
        grads.append(model.w.grad.tolist())
        engine.step()
    return grads, model.w.detach().tolist()


def _adam_first_step(w0: list[float], g: list[float]) -> list[float]:
    return [w - LR * gi / (abs(gi) + EPS) for w, gi in zip(w0, g, strict=True)]


W0 = [0.5, -0.25]


@pytest.mark.parametrize(("mode", "scale", "after1", "after2"), [
    # s = 1: c1 = (1.5, 0.75) -> (1, 0.75); c2 = (-2, 0.5)
    ("accumulated", 1.0, [1.0, 0.75], [-1.0, 1.0]),  # clamp((1 - 2, 0.75 + 0.5)) = clamp((-1, 1.25))
    ("per_micro_batch", 1.0, [1.0, 0.75], [0.0, 1.25]),  # (1, 0.75) + clamp((-2, 0.5)) = (1, 0.75) + (-1, 0.5)
    # s = 5: c1 = (7.5, 3.75) -> (1, 1); c2 = (-10, 2.5)
    ("accumulated", 5.0, [1.0, 1.0], [-1.0, 1.0]),  # clamp((-9, 3.5))
    ("per_micro_batch", 5.0, [1.0, 1.0], [0.0, 2.0]),  # (1, 1) + (-1, 1)
    # s = 0.25: c1 = (0.375, 0.1875), c2 = (-0.5, 0.125): nothing reaches the clip value
    ("accumulated", 0.25, [0.375, 0.1875], [-0.125, 0.3125]),
    ("per_micro_batch", 0.25, [0.375, 0.1875], [-0.125, 0.3125]),
])
def test_clipping_matches_the_hand_worked_example(mode: str, scale: float, after1: list[float],
                                                  after2: list[float]) -> None:
    grads, w = _run(mode, scale)
    assert grads[0] == pytest.approx(after1, abs=1e-12)
    assert grads[1] == pytest.approx(after2, abs=1e-12)
    assert w == pytest.approx(_adam_first_step(W0, after2), abs=1e-12)


def test_the_two_modes_give_different_updates() -> None:
    """Per micro-batch, the first weight's clipped contributions cancel (+1, -1): it does not move at all."""
    _, w_acc = _run("accumulated", 1.0)
    _, w_micro = _run("per_micro_batch", 1.0)
    assert w_acc == pytest.approx([0.5 + LR, -0.25 - LR], abs=1e-7)
    assert w_micro == pytest.approx([0.5, -0.25 - LR], abs=1e-7)


def test_no_clipping_is_the_plain_scaled_sum() -> None:
    grads, _ = _run("accumulated", 1.0, clip=None)
    assert grads[0] == pytest.approx([1.5, 0.75], abs=1e-12)
    assert grads[1] == pytest.approx([-0.5, 1.25], abs=1e-12)


def test_the_accumulator_restarts_after_each_optimiser_step() -> None:
    """A second step sees only its own micro-batches: nothing clipped in step 1 leaks into step 2."""
    cfg = RunConfig(optim=OptimConfig(lr=LR, weight_decay=0.0, batch_size=2, micro_batch_size=1, clip_value=1.0))
    model = _Linear()
    engine = TorchEngine(model, cfg, torch.device("cpu"))
    for x, t in MICRO:
        engine.backward((model.w @ torch.tensor(x, dtype=torch.float64) - t) ** 2)
        engine.step()
    assert engine.clipper.accumulated == {}
    w1 = _adam_first_step(W0, [-1.0, 1.0])
    r1 = 2 * w1[0] + w1[1]  # micro-step 1 of step 2: gradient 2 r1 (2, 1) / 2
    engine.backward((model.w @ torch.tensor(MICRO[0][0], dtype=torch.float64)) ** 2)
    assert model.w.grad.tolist() == pytest.approx([max(-1, min(1, 2 * r1)), max(-1, min(1, r1))], abs=1e-12)


def test_clip_mode_is_validated() -> None:
    with pytest.raises(ConfigError, match="optim.clip_mode"):
        OptimConfig(clip_mode="global_norm")


_DEEPSPEED_SCRIPT = r'''
import json, os, sys
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
import deepspeed, torch
from torch import nn
from pertadapt.config.components import AdaptiveLoss
from pertadapt.config.schema import EngineConfig, OptimConfig, RunConfig
from pertadapt.train.engine import DeepSpeedEngine

class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.5, -0.25]))

    def forward(self, x):
        return x @ self.w

out = {}
for stage in (0, 2, 3):
    for mode in ("accumulated", "per_micro_batch"):
        cfg = RunConfig(optim=OptimConfig(lr=0.1, weight_decay=0.0, batch_size=2, micro_batch_size=1, clip_value=1.0,
                                          clip_mode=mode), loss=AdaptiveLoss(scale=5.0),
                        engine=EngineConfig(name="deepspeed", workers=1, deepspeed_config=f"zero{stage}.json"))
        e = DeepSpeedEngine(Linear(), cfg)
        for x, t in [((2.0, 1.0), 0.0), ((2.0, -0.5), 2.125)]:
            e.backward((e.ds(torch.tensor(x)) - t) ** 2)
            e.step()
        with deepspeed.zero.GatheredParameters([e.model.w], enabled=stage == 3):
            out[f"{stage}-{mode}"] = e.model.w.detach().tolist()
print("RESULT " + json.dumps(out))
'''


def test_deepspeed_engine_clips_like_the_torch_engine(tmp_path) -> None:
    """ZeRO-0/2/3 in one process (gloo): the same hooks give the hand-worked updates (loss.scale = 5)."""
    import json
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-c", _DEEPSPEED_SCRIPT, str(port)], capture_output=True, text=True,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"}, cwd=tmp_path, timeout=300)
    line = [s for s in proc.stdout.splitlines() if s.startswith("RESULT ")]
    assert line, proc.stderr[-3000:]
    got = json.loads(line[0][len("RESULT "):])
    for stage in (0, 2, 3):
        assert got[f"{stage}-accumulated"] == pytest.approx(_adam_first_step(W0, [-1.0, 1.0]), abs=1e-6)
        assert got[f"{stage}-per_micro_batch"] == pytest.approx(_adam_first_step(W0, [0.0, 2.0]), abs=1e-6)
