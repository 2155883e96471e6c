"""One parametrised contract test over every transform (and its Inverse).

Each family lists its cases once, in ``tests/transforms/cases_<family>.py`` as ``CASES``; this
file collects them all and runs the shared checker (:func:`tests.checks.check_transform`).
"""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import tests.transforms as family_tests
from tests.checks import Case, check_transform


def all_cases() -> list[Case]:
    cases: list[Case] = []
    for info in pkgutil.iter_modules(family_tests.__path__):
        if info.name.startswith("cases_"):
            module = importlib.import_module(f"tests.transforms.{info.name}")
            cases.extend(module.CASES)
    return cases


CASES = all_cases()


@pytest.mark.parametrize("case", CASES, ids=str)
def test_transform_contract(case: Case) -> None:
    check_transform(case)
