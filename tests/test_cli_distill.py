"""``pushforward distill``, run in-process with tiny budgets: a tiny MAF teacher fitted by the
CLI is distilled into an IAF student saved in the teacher's units (same scaling), with test
log-likelihoods and sampling times of both reported; refusals and bad inputs are one stderr
line with a non-zero exit."""

from __future__ import annotations

import contextlib
import io as text_io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pushforward import cli
from pushforward import io as model_io

TINY = ["--layers", "2", "--hidden", "16,16"]


def run(*argv: object) -> tuple[int, str, str]:
    """``main(argv)`` with stdout and stderr captured."""
    out, err = text_io.StringIO(), text_io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def fails(*argv: object, match: str) -> str:
    """Assert a one-line ``pushforward: error:`` naming ``match``, non-zero exit, no traceback."""
    code, out, err = run(*argv)
    lines = err.strip().splitlines()
    assert code != 0, (out, err)
    assert len(lines) == 1 and lines[0].startswith("pushforward: error: "), err
    assert match in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny MAF fitted by the CLI on 400 rows of a 2-D file (data far from standardised)."""
    root = tmp_path_factory.mktemp("distill")
    rng = np.random.default_rng(0)
    centres = np.array([[10.0, -3.0], [14.0, 1.0]])
    data = centres[rng.integers(0, 2, 400)] + rng.normal(size=(400, 2)) * [1.0, 0.3]
    path = root / "data.npy"
    np.save(path, data.astype(np.float32))
    directory = root / "teacher"
    code, _, err = run("fit", path, "--flow", "maf", *TINY, "--epochs", "3", "--out", directory)
    assert code == 0, err
    return directory, path


def test_distill_saves_a_student_in_the_teachers_units_and_reports(teacher, tmp_path) -> None:
    directory, data = teacher
    out = tmp_path / "student"
    code, printed, err = run("distill", directory, "--out", out, "--steps", "150", "--json")
    assert code == 0, err
    metrics = json.loads(printed)
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert {"model.safetensors", "config.json", "training_curves.png", "density.png"} <= {
        p.name for p in out.iterdir()
    }
    assert metrics["flow"] == "iaf" and metrics["teacher_flow"] == "maf"
    assert metrics["objective"] == "both" and metrics["steps"] == 150
    assert metrics["data"] == str(data) and metrics["n_test"] == 400  # the teacher's data
    teacher_ll, student_ll = (
        metrics["teacher_test_log_likelihood"],
        metrics["student_test_log_likelihood"],
    )
    assert math.isfinite(teacher_ll) and abs(student_ll - teacher_ll) < 0.1, metrics
    assert math.isfinite(metrics["student_test_median_log_likelihood"])
    assert -0.02 < metrics["kl_student_teacher"] < 0.1
    assert metrics["sample_n"] == 10_000
    assert metrics["teacher_sample_seconds"] > 0 and metrics["student_sample_seconds"] > 0
    config = json.loads((out / "config.json").read_text())
    teacher_config = json.loads((directory / "config.json").read_text())
    assert config["flow"] == "iaf" and config["options"] == {"layers": 2, "hidden": [16, 16]}
    assert config["scaling"] == teacher_config["scaling"]  # log-densities in the data's units
    assert config["teacher_flow"] == "maf" and config["objective"] == "both"
    # the saved student reproduces the reported log-likelihood through `eval`
    code, printed, _ = run("eval", out, data, "--json")
    assert code == 0
    assert json.loads(printed)["log_likelihood"] == pytest.approx(student_ll, abs=1e-4)
    student, _ = model_io.load_model(out)
    with torch.no_grad():
        rows = torch.from_numpy(np.load(data))
        assert float(student.log_prob(rows).double().mean()) == pytest.approx(student_ll, 1e-4)

    # a second run refuses to overwrite the student without --force, then overwrites with it
    fails("distill", directory, "--out", out, "--steps", "2", match="already holds a model")
    code, printed, err = run(
        "distill", directory, "--out", out, "--steps", "3", "--objective", "kl",
        "--data", data, "--layers", "1", "--force",
    )  # fmt: skip
    assert code == 0, err
    assert "test log-likelihood on" in printed and "sampling 10000: teacher" in printed
    assert "KL(student || teacher)" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["options"] == {"layers": 1, "hidden": [16, 16]} and config["objective"] == "kl"


def test_distill_errors(teacher, tmp_path) -> None:
    directory, data = teacher
    out = tmp_path / "student"
    fails("distill", tmp_path / "missing", "--out", out, match="model directory not found")
    fails("distill", directory, "--out", out, "--objective", "l2", match="unknown objective 'l2'")
    fails("distill", directory, "--out", out, "--flow", "nope", match="unknown flow 'nope'")
    fails("distill", directory, "--out", directory, "--force", match="the teacher's directory")
    fails("distill", directory, "--out", out, "--data", tmp_path / "nope.npy", match="nope.npy")
    wide = tmp_path / "wide.npy"
    np.save(wide, np.zeros((5, 3), dtype=np.float32))
    fails("distill", directory, "--out", out, "--data", wide, match="3")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(directory, corrupt)
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    fails("distill", corrupt, "--out", out, match="model.safetensors")
    (corrupt / "config.json").write_text("{not json")
    fails("distill", corrupt, "--out", out, match="not valid JSON")
    (corrupt / "config.json").write_text(json.dumps({"format": "pushforward", "kind": "vae"}))
    fails("distill", corrupt, "--out", out, match="'flow' must name a registered flow")
    mog = tmp_path / "maf-mog"  # a teacher whose base an IAF cannot take
    config = model_io.make_config("maf-mog", 2, 0, {"layers": 1, "hidden": [8]})
    model_io.save_model(mog, model_io.model_from_config(config), config)
    fails("distill", mog, "--out", out, match="use --objective kl")
    assert not out.exists()
