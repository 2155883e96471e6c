"""Checkpoints of ``fit``: a run interrupted and resumed ends exactly as an uninterrupted one,
a checkpoint of another run is refused, and a killed ``pushforward fit`` continues with
``--resume``."""

from __future__ import annotations

import contextlib
import io as text_io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pushforward import cli, flows
from pushforward import io as model_io
from pushforward.core import PushforwardError
from pushforward.train import CHECKPOINT_FILE, CHECKPOINT_JSON, fit


class Interrupt(Exception):
    pass


def _data() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(300, 2, generator=g) * torch.tensor([1.0, 2.0])


def _flow(**options) -> torch.nn.Module:
    torch.manual_seed(1)
    return flows.build("maf", 2, **{"layers": 1, "hidden": (8,), **options})


def _noise(x: torch.Tensor) -> torch.Tensor:  # draws from torch's generator, like dequantization
    return x + 0.01 * torch.rand_like(x)


SETTINGS = {"epochs": 3, "batch_size": 32, "seed": 3, "progress": False, "preprocess": _noise}


def _interrupted(folder: Path, at_epoch: int = 2, **extra) -> None:
    """A run with a checkpoint every 5 steps, stopped by an exception after ``at_epoch``."""

    def stop(epoch: int, history) -> None:
        if epoch == at_epoch:
            raise Interrupt

    with pytest.raises(Interrupt):
        fit(
            _flow(),
            _data(),
            checkpoint=folder,
            checkpoint_steps=5,
            checkpoint_every=None,
            callback=stop,
            **{**SETTINGS, **extra},
        )


@pytest.mark.parametrize("average", [None, 0.9])
def test_resumed_run_equals_an_uninterrupted_one(tmp_path: Path, average: float | None) -> None:
    settings = {**SETTINGS, "average": average}
    whole = _flow()
    expected = fit(whole, _data(), **settings)
    _interrupted(tmp_path, average=average)
    saved = json.loads((tmp_path / CHECKPOINT_JSON).read_text())
    assert saved["history"]["steps"] == 15 and saved["epoch"] == 2 and saved["batches"] == 7
    assert ("average_updates" in saved) == (average is not None)
    resumed = _flow()
    history = fit(
        resumed, _data(), checkpoint=tmp_path, checkpoint_steps=5, resume=True, **settings
    )
    assert history.steps == expected.steps == 3 * (270 // 32)
    assert history.train_loss == expected.train_loss
    assert history.valid_log_likelihood == expected.valid_log_likelihood
    assert history.best_epoch == expected.best_epoch and history.stopped == expected.stopped
    for key, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    # the run's end is a checkpoint too: resuming it gives the final weights at once
    again = _flow()
    assert fit(again, _data(), checkpoint=tmp_path, resume=True, **settings).steps == 24
    for key, value in whole.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_a_checkpoint_of_another_run_is_refused(tmp_path: Path) -> None:
    _interrupted(tmp_path, at_epoch=1)
    assert (tmp_path / CHECKPOINT_FILE).is_file()
    cases = [
        ({"flow": _flow(hidden=(4,))}, "different flow"),
        ({"data": _data()[:200]}, "different train data"),
        ({"data": _data() + 1}, "different train data"),
        ({"batch_size": 16}, "batch_size=32"),
        ({"seed": 4}, "seed=3"),
        ({"average": 0.99}, "average=None"),
    ]
    for change, match in cases:
        flow = change.pop("flow", _flow())
        data = change.pop("data", _data())
        with pytest.raises(PushforwardError, match=match):
            fit(flow, data, checkpoint=tmp_path, resume=True, **{**SETTINGS, **change})
    with pytest.raises(PushforwardError, match="no checkpoint to resume from"):
        fit(_flow(), _data(), checkpoint=tmp_path / "none", resume=True, **SETTINGS)
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(PushforwardError, match="not a valid checkpoint"):
        fit(_flow(), _data(), checkpoint=tmp_path, resume=True, **SETTINGS)


def _run(*argv: str) -> tuple[int, str, str]:
    out, err = text_io.StringIO(), text_io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


FIT = ["fit", "moons", "--flow", "maf", "--layers", "1", "--hidden", "8", "--epochs", "2"]
FIT += ["--batch-size", "32", "--json"]


def test_cli_resume_without_a_checkpoint_is_one_clear_error(tmp_path: Path) -> None:
    code, _, err = _run(*FIT, "--out", tmp_path / "run", "--resume")
    assert code == 1 and err.count("\n") == 1
    assert err.startswith("pushforward: error: --resume:") and "no checkpoint" in err


def test_killed_fit_resumes_where_its_checkpoint_left_off(tmp_path: Path) -> None:
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "pushforward", *FIT, "--out", str(killed)]
    process = subprocess.Popen(
        [*command, "--checkpoint-every", "0.2"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoint = killed / cli.CHECKPOINT_DIR / CHECKPOINT_FILE
    try:
        deadline = time.monotonic() + 60
        while not checkpoint.is_file() and process.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint within 60 s"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not model_io.has_model(killed)
    from safetensors import safe_open

    with safe_open(str(checkpoint), framework="pt") as f:  # the JSON copy may not be written
        saved = json.loads(f.metadata()["pushforward"])
    steps_at_checkpoint = saved["history"]["steps"]
    assert 0 < steps_at_checkpoint < 2 * (18000 // 32) and not saved["finished"]

    code, out, err = _run(*FIT, "--out", killed, "--resume", "--checkpoint-every", "0.2")
    assert code == 0, err
    resumed = json.loads(out)
    code, out, err = _run(*FIT, "--out", tmp_path / "whole")
    assert code == 0, err
    whole = json.loads(out)
    assert resumed["steps"] == whole["steps"] == 2 * (18000 // 32)
    assert resumed["history"]["train_loss"] == whole["history"]["train_loss"]
    a, _ = model_io.load_model(killed)
    b, _ = model_io.load_model(tmp_path / "whole")
    for key, value in b.state_dict().items():
        assert torch.equal(a.state_dict()[key], value), key
    # a finished run's checkpoint is removed; --resume then says so and keeps the model
    assert not checkpoint.parent.exists()
    saved = (killed / model_io.MODEL_FILE).read_bytes()
    code, out, err = _run(*FIT, "--out", killed, "--resume")
    assert code == 1 and "its run finished: the model is saved" in err
    assert (killed / model_io.MODEL_FILE).read_bytes() == saved
