"""``pushforward vae`` and ``eval`` on a VAE directory: a tiny run on binarized digits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_cli import fails, run

pytest.importorskip("sklearn")

TINY = ["--latent", "2", "--hidden", "16", "--context", "8", "--epochs", "1", "--warmup", "0"]


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("vae") / "v"
    args = ["vae", "digits", "--posterior", "planar", "--flow-length", "2", *TINY]
    code, stdout, err = run(*args, "--iw-samples", "5", "--out", out, "--json")
    assert code == 0, err
    return out, json.loads(stdout)


def test_vae_writes_model_metrics_and_plots(vae_dir) -> None:
    out, metrics = vae_dir
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "metrics.json", "latent.png"} <= names
    assert {"reconstructions.png", "samples.png"} <= names
    assert metrics["posterior"] == "planar" and metrics["test_n"] == 297
    # the importance-weighted bound is above the ELBO (same draws, in expectation and here)
    assert metrics["test_log_likelihood"] >= metrics["test_elbo"] - 1e-6
    assert json.loads((out / "config.json").read_text())["levels"] == 17


def test_eval_on_a_vae_prints_elbo_and_iw_log_likelihood(vae_dir) -> None:
    out, metrics = vae_dir
    code, stdout, err = run("eval", out, "digits", "--iw-samples", "5", "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert {"elbo", "log_likelihood", "n", "iw_samples", "bits_per_dim"} <= set(result)
    assert result["iw_samples"] == 5 and result["n"] == 297
    assert result["elbo"] == pytest.approx(metrics["test_elbo"])  # same seeds: same figure


def test_vae_bad_input(vae_dir, tmp_path: Path) -> None:
    out, _ = vae_dir
    fails("vae", "digits", "--posterior", "nope", *TINY, "--out", tmp_path / "a", match="nope")
    fails("vae", "digits", *TINY, "--out", out, match="already holds a model")
    fails("vae", "digits", "--posterior", "glow", *TINY, "--out", tmp_path / "b", match="glow")


def test_vae_posterior_options_reach_the_recipe_and_the_saved_model(tmp_path: Path) -> None:
    out = tmp_path / "o"
    args = ["vae", "digits", "--posterior", "sylvester-orthogonal", "--flow-length", "2"]
    code, _, err = run(*args, "--posterior-option", "columns=1", *TINY, "--iw-samples", "2",
                       "--out", out)  # fmt: skip
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["options"]["flow_options"] == {"columns": 1}
    code, _, err = run("eval", out, "digits", "--iw-samples", "2", "--json")
    assert code == 0, err
    fails(*args, "--posterior-option", "columns", *TINY, "--out", tmp_path / "p",
          match="expected NAME=VALUE")  # fmt: skip
    fails(*args, "--posterior-option", "colums=2", *TINY, "--out", tmp_path / "q",
          match="colums")  # fmt: skip
