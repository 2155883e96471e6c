"""Multi-process training: ``fit`` under ``torchrun`` with two CPU processes (gloo) gives the
weights of one process training on the same global batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pushforward import flows
from pushforward.train import fit

TORCHRUN = Path(sys.executable).with_name("torchrun")

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available",
)

SCRIPT = textwrap.dedent(
    """
    import json
    import sys

    import torch
    from safetensors.torch import save_file

    from pushforward import flows
    from pushforward.distributed import is_main
    from pushforward.train import fit

    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = torch.randn(300, 2) * torch.tensor([1.0, 2.0])
    valid = torch.randn(50, 2)
    torch.manual_seed(1)
    flow = flows.build("maf", 2, layers=1, hidden=(8,))
    history = fit(flow, data, valid, epochs=2, batch_size=48, progress=False, seed=3)
    if is_main():
        state = {k: v.contiguous() for k, v in flow.state_dict().items()}
        save_file(state, sys.argv[1], metadata={"steps": str(history.steps),
                  "valid": json.dumps(history.valid_log_likelihood)})
    """
)


def test_two_cpu_processes_match_one(tmp_path: Path) -> None:
    if not TORCHRUN.exists():
        pytest.skip(f"{TORCHRUN} not found")
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    out = tmp_path / "weights.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    result = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", str(script), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        got = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta = f.metadata()

    torch.manual_seed(0)
    data = torch.randn(300, 2) * torch.tensor([1.0, 2.0])
    valid = torch.randn(50, 2)
    torch.manual_seed(1)
    flow = flows.build("maf", 2, layers=1, hidden=(8,))
    history = fit(flow, data, valid, epochs=2, batch_size=48, progress=False, seed=3)
    assert int(meta["steps"]) == history.steps == 2 * (300 // 48)
    assert json.loads(meta["valid"]) == pytest.approx(history.valid_log_likelihood, abs=1e-5)
    expected = flow.state_dict()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, atol=1e-5, rtol=1e-5)
