"""Every registered flow passes the shared checker; the registry's option handling."""

from __future__ import annotations

import pytest

from pushforward import flows
from pushforward.core import PushforwardError
from tests.checks import check_flow

SMALL = {"hidden": (16, 16)}  # applied where a recipe has the option, to keep the suite fast


def small_options(name: str, layers: int = 2) -> dict:
    allowed = flows.describe(name).options
    opts = {k: v for k, v in SMALL.items() if k in allowed}
    if "layers" in allowed:
        opts["layers"] = layers
    if "bins" in allowed:
        opts["bins"] = 4
    return opts


CASES = [(name, d, c) for name in flows.names() for d, c in ((1, 0), (2, 0), (3, 2))]


@pytest.mark.parametrize("name,features,context", CASES, ids=lambda v: str(v))
def test_registered_flow(name: str, features: int, context: int) -> None:
    check_flow(name, features, context, **small_options(name))


def test_unknown_flow_is_a_clear_error() -> None:
    with pytest.raises(PushforwardError, match="unknown flow 'nope'; choose from"):
        flows.build("nope", 2)


def test_unknown_option_names_it() -> None:
    with pytest.raises(PushforwardError, match="has no option 'bins'"):
        flows.build("planar", 2, bins=3)


def test_bad_features() -> None:
    with pytest.raises(PushforwardError, match="features must be a positive integer"):
        flows.build("planar", 0)


def test_unknown_base() -> None:
    with pytest.raises(PushforwardError, match="unknown base 'cauchy'"):
        flows.build("planar", 2, base="cauchy")


def test_every_recipe_has_a_summary() -> None:
    for name in flows.names():
        assert flows.describe(name).summary
