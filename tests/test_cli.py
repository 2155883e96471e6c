"""The ``pushforward`` command, run in-process with tiny budgets: the fit -> eval -> sample ->
plot round trip, and one clear stderr line with a non-zero exit for every kind of bad input."""

from __future__ import annotations

import contextlib
import io as text_io
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pushforward import cli, flows
from pushforward import io as model_io
from pushforward.data import load

FLOW = ["--flow", "lu", "--layers", "1"]  # a real, cheap recipe


def run(*argv: str) -> tuple[int, str, str]:
    """``main(argv)`` with stdout and stderr captured."""
    out, err = text_io.StringIO(), text_io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def fails(*argv: str, match: str) -> str:
    """Assert a one-line ``pushforward: error:`` naming ``match``, non-zero exit, no traceback."""
    code, out, err = run(*argv)
    lines = err.strip().splitlines()
    assert code != 0, (out, err)
    assert len(lines) == 1 and lines[0].startswith("pushforward: error: "), err
    assert "Traceback" not in err
    assert match in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    directory = tmp_path_factory.mktemp("runs") / "moons"
    code, out, err = run("fit", "moons", *FLOW, "--epochs", "2", "--out", directory, "--json")
    assert code == 0, err
    return directory, json.loads(out)


def test_fit_writes_model_metrics_and_plots(model) -> None:
    directory, printed = model
    names = {p.name for p in directory.iterdir()}
    assert {"model.safetensors", "config.json", "metrics.json"} <= names
    assert {"training_curves.png", "density.png"} <= names
    metrics = json.loads((directory / "metrics.json").read_text())
    assert metrics == printed
    for key in ("train_log_likelihood", "valid_log_likelihood", "test_log_likelihood"):
        assert math.isfinite(metrics[key])
    assert metrics["n_train"] + metrics["n_valid"] == 20000 and metrics["n_test"] == 10000
    assert metrics["epochs"] == 2 and "seconds" in metrics and "stopped" in metrics
    config = json.loads((directory / "config.json").read_text())
    assert config["flow"] == "lu" and config["options"] == {"layers": 1}  # only what was given
    assert config["features"] == 2 and config["data"] == "moons" and config["seed"] == 0
    assert len(config["scaling"]["loc"]) == 2 and min(config["scaling"]["scale"]) > 0


def test_eval_equals_the_flows_mean_log_prob(model) -> None:
    directory, metrics = model
    code, out, _ = run("eval", directory, "moons", "--json")
    assert code == 0
    result = json.loads(out)
    flow, _ = model_io.load_model(directory)
    with torch.no_grad():
        direct = flow.log_prob(torch.from_numpy(load("moons", "test"))).double().mean()
    assert result["log_likelihood"] == pytest.approx(float(direct), abs=1e-5)
    assert result["log_likelihood"] == pytest.approx(metrics["test_log_likelihood"], abs=1e-5)
    assert result["bits_per_dim"] == pytest.approx(-result["log_likelihood"] / (2 * math.log(2)))
    assert "true_log_likelihood" not in result  # moons has no closed-form density


def test_eval_on_a_toy_with_a_known_density_reports_the_gap(model) -> None:
    from pushforward.data import toy_log_prob

    directory, _ = model  # a moons model evaluated on 8gaussians: any model will do
    code, out, _ = run("eval", directory, "8gaussians", "--json")
    assert code == 0
    result = json.loads(out)
    truth = float(toy_log_prob("8gaussians", load("8gaussians", "test")).mean())
    assert result["true_log_likelihood"] == pytest.approx(truth)
    assert result["gap"] == pytest.approx(truth - result["log_likelihood"])
    assert (result["n"], result["features"]) == (10000, 2)
    code, out, _ = run("eval", directory, "moons")  # human-readable form
    assert code == 0 and "log_likelihood" in out and "bits_per_dim" in out


def test_eval_on_a_csv_file(model, tmp_path: Path) -> None:
    directory, _ = model
    x = load("moons", "test")[:50]
    path = tmp_path / "points.csv"
    path.write_text("x,y\n" + "\n".join(f"{a!r},{b!r}" for a, b in x.tolist()) + "\n")
    code, out, _ = run("eval", directory, path, "--json")
    flow, _ = model_io.load_model(directory)
    with torch.no_grad():
        direct = float(flow.log_prob(torch.from_numpy(x)).mean())
    assert code == 0 and json.loads(out)["log_likelihood"] == pytest.approx(direct, abs=1e-5)
    assert json.loads(out)["n"] == 50


def test_sample_writes_npy_and_refuses_to_overwrite(model, tmp_path: Path) -> None:
    directory, _ = model
    path = tmp_path / "s.npy"
    assert run("sample", directory, "-n", 300, "--out", path, "--seed", 1)[0] == 0
    samples = np.load(path)
    assert samples.shape == (300, 2) and samples.dtype == np.float32
    assert np.isfinite(samples).all() and abs(samples.mean(0)).max() < 3
    fails("sample", directory, "-n", 10, "--out", path, match="already exists")
    np.testing.assert_array_equal(np.load(path), samples)  # untouched
    assert run("sample", directory, "-n", 300, "--out", path, "--seed", 1, "--force")[0] == 0
    np.testing.assert_array_equal(np.load(path), samples)  # same seed, same samples
    fails("sample", directory, "-n", 5, "--out", tmp_path / "s.txt", match="must name a .npy")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npy"]  # no partial files


def test_plot_redraws_into_a_folder(model, tmp_path: Path) -> None:
    directory, _ = model
    code, out, _ = run("plot", directory, "--out", tmp_path / "figs")
    assert code == 0
    names = {p.name for p in (tmp_path / "figs").iterdir()}
    assert {"training_curves.png", "density.png"} <= names


def test_flows_lists_every_registered_name() -> None:
    code, out, _ = run("flows")
    lines = out.strip().splitlines()
    assert code == 0 and [line.split()[0] for line in lines] == flows.names()


def test_default_flow_is_resolved_at_run_time() -> None:
    name = cli.default_flow()
    assert name in flows.names()
    assert name == cli.DEFAULT_FLOW or cli.DEFAULT_FLOW not in flows.names()


@pytest.mark.parametrize(
    "features,plot", [(1, "change_of_variables.png"), (3, "pairs.png")], ids=["1d", "3d"]
)
def test_fit_on_files_of_other_dimensions(tmp_path: Path, features: int, plot: str) -> None:
    data = np.random.default_rng(0).normal(size=(300, features)) * 3 + 1
    np.save(tmp_path / "x.npy", data)
    out = tmp_path / "m"
    code, _, err = run("fit", tmp_path / "x.npy", *FLOW, "--epochs", 1, "--out", out)
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_train"] == 270 and metrics["n_valid"] == 30
    assert "test_log_likelihood" not in metrics
    assert (out / plot).is_file()


def test_fit_with_a_weight_average_records_it_and_its_metrics_describe_the_saved_model(
    tmp_path: Path,
) -> None:
    data = np.random.default_rng(0).normal(size=(300, 2)) * 3 + 1
    np.save(tmp_path / "x.npy", data)
    out = tmp_path / "m"
    code, _, err = run("fit", tmp_path / "x.npy", *FLOW, "--epochs", 3, "--average", "0.9",
                       "--out", out)  # fmt: skip
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["training"]["average"] == 0.9
    metrics = json.loads((out / "metrics.json").read_text())
    code, printed, err = run("eval", out, tmp_path / "x.npy", "--json")
    assert code == 0, err
    whole = json.loads(printed)["log_likelihood"]
    # the saved (averaged) model's log-likelihood on all rows is the mean of its train/valid
    both = (270 * metrics["train_log_likelihood"] + 30 * metrics["valid_log_likelihood"]) / 300
    assert whole == pytest.approx(both, abs=1e-4)


def test_fit_uses_miniboones_valid_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "miniboone.npz",
        val=rng.normal(size=(40, 3)).astype(np.float32),
        test=rng.normal(size=(60, 3)).astype(np.float32),
    )
    monkeypatch.setenv("PUSHFORWARD_DATA", str(tmp_path))
    out_dir = tmp_path / "m"
    code, out, err = run("fit", "miniboone", *FLOW, "--epochs", 1, "--out", out_dir, "--json")
    assert code == 0, err
    metrics = json.loads(out)
    assert (metrics["n_train"], metrics["n_valid"], metrics["n_test"]) == (70, 10, 20)


# --- errors ------------------------------------------------------------------------------------


def test_bad_data_files(model, tmp_path: Path) -> None:
    directory, _ = model
    bad = np.zeros((20, 2))
    bad[3, 1] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    fails("fit", tmp_path / "nan.npy", *FLOW, "--out", tmp_path / "a", match="NaN or infinite")
    bad[3, 1] = np.inf
    np.save(tmp_path / "inf.npy", bad)
    fails("eval", directory, tmp_path / "inf.npy", match="NaN or infinite")
    (tmp_path / "words.csv").write_text("a,b\n1,2\n3,four\n")
    fails("fit", tmp_path / "words.csv", *FLOW, match="'four' is not a number")
    (tmp_path / "empty.csv").write_text("")
    fails("fit", tmp_path / "empty.csv", *FLOW, match="is empty")
    fails("eval", directory, tmp_path / "empty.csv", match="is empty")
    np.save(tmp_path / "three.npy", np.zeros((5, 3)))
    fails("eval", directory, tmp_path / "three.npy", match="model has 2 features, data has 3")
    assert not (tmp_path / "a").exists()


def test_unknown_names() -> None:
    fails("fit", "moons", "--flow", "nope", match="unknown flow 'nope'")
    message = fails("fit", "nope", *FLOW, match="unknown dataset 'nope'")
    assert "moons" in message and "miniboone" in message
    fails("fit", "moons", "--flow", "affine", "--layers", 2, match="has no option 'layers'")
    fails("fit", "moons", "--flow", "lu", "--bins", 8, match="has no option 'bins'")


def test_missing_and_damaged_models(model, tmp_path: Path) -> None:
    directory, _ = model
    fails("eval", tmp_path / "nowhere", "moons", match="model directory not found")
    fails("sample", tmp_path / "nowhere", "-n", 3, "--out", tmp_path / "s.npy", match="not found")
    fails("plot", tmp_path / "nowhere", match="model directory not found")
    broken = tmp_path / "broken"
    shutil.copytree(directory, broken)
    blob = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(blob[: len(blob) // 3])
    fails("eval", broken, "moons", match="not a valid safetensors file")
    (broken / "model.safetensors").write_bytes(blob)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "flow": "planar"}))
    fails("eval", broken, "moons", match="weight '")
    (broken / "config.json").write_text(json.dumps({**config, "features": 3}))
    fails("sample", broken, "-n", 3, "--out", tmp_path / "s.npy", match="scaling")
    (broken / "config.json").write_text("{not json")
    fails("plot", broken, match="config.json is not valid JSON")
    assert not (tmp_path / "s.npy").exists()


def test_existing_model_is_kept_without_force(model, tmp_path: Path) -> None:
    directory, _ = model
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    fails("fit", "moons", *FLOW, "--epochs", 1, "--out", directory, match="already holds a model")
    np.save(tmp_path / "nan.npy", np.full((10, 2), np.nan))
    fails("fit", tmp_path / "nan.npy", *FLOW, "--out", directory, "--force", match="NaN")
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before


def test_usage_errors_exit_2() -> None:
    assert run("fit")[0] == 2
    assert run("sample", "somewhere", "-n", "0", "--out", "x.npy")[0] == 2
    assert run("fit", "moons", "--hidden", "a,b")[0] == 2
    assert run("fit", "moons", "--average", "1")[0] == 2
    assert run("--help")[0] == 0


def test_fit_target(tmp_path: Path) -> None:
    out = tmp_path / "u1"
    code, stdout, err = run("fit-target", "U1", "--layers", 2, "--steps", 5, "--out", out, "--json")
    assert code == 0, err
    metrics = json.loads(stdout)
    assert metrics["target"] == "U1" and math.isfinite(metrics["reverse_kl"])
    assert (out / "target_vs_flow.png").is_file()
    assert model_io.load_model(out)[1]["target"] == "U1"
    fails("fit-target", "U9", match="unknown target 'U9'")
    fails("fit-target", "U1", "--out", out, match="already holds a model")


def test_real_process_has_no_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pushforward.cli", "eval", str(tmp_path / "none"), "moons"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"pushforward: error: model directory not found: {tmp_path / 'none'}"
    ]
