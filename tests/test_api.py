"""The top-level API: ``from visionleaf import TreeSampler, ...`` works and ``import visionleaf`` stays light."""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import subprocess
import sys

import pytest

import visionleaf


def test_import_loads_nothing_heavy():
    code = (
        "import json, sys, visionleaf; dir(visionleaf); "
        "print(json.dumps(sorted(m for m in ('torch', 'transformers', 'verl', 'ray', 'PIL') if m in sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert json.loads(result.stdout) == []


@pytest.mark.parametrize("name", visionleaf.__all__)
def test_public_name_is_its_modules_object(name):
    value = getattr(visionleaf, name)
    defining = importlib.import_module(visionleaf._EXPORTS[name])
    assert value is getattr(defining, name)


def test_from_import():
    from visionleaf import HFEngine, SamplingParams, TreeConfig, TreeSampler, compute_score  # noqa: F401

    assert TreeConfig(budget=4).budget == 4
    assert SamplingParams(max_new_tokens=8).max_new_tokens == 8


def test_all_lists_exactly_the_exports_and_dir_shows_them():
    assert sorted(visionleaf.__all__) == sorted(visionleaf._EXPORTS)
    assert set(visionleaf.__all__) <= set(dir(visionleaf))


def test_type_checking_imports_match_the_exports():
    # the `if TYPE_CHECKING:` block (for type checkers and IDEs) imports each name from its module
    tree = ast.parse(inspect.getsource(visionleaf))
    block = next(node for node in tree.body if isinstance(node, ast.If))
    imported = {
        alias.name: node.module for node in block.body if isinstance(node, ast.ImportFrom) for alias in node.names
    }
    assert imported == visionleaf._EXPORTS


def test_unknown_name_says_what_exists():
    with pytest.raises(AttributeError, match=r"no attribute 'TreeSamplr'.*TreeSampler"):
        visionleaf.TreeSamplr  # noqa: B018
    with pytest.raises(ImportError):
        from visionleaf import TreeSamplr  # noqa: F401
