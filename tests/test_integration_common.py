"""String ids and the whole-group check shared by the verl and TRL adapters."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from fiberpo_theory.integrations._common import require_whole_groups, string_ids


def test_string_ids_first_appearance_order():
    ids = string_ids(["b", "a", "b", "c", "a"])
    assert ids.dtype == torch.long
    assert ids.tolist() == [0, 1, 0, 2, 1]


def test_string_ids_accepts_numpy_object_arrays():
    assert string_ids(np.array(["math", "code", "math"], dtype=object)).tolist() == [0, 1, 0]
    assert string_ids([]).tolist() == []


def test_string_ids_rejects_a_bare_string_and_unhashables():
    with pytest.raises(ValueError, match="single string"):
        string_ids("abc")
    with pytest.raises(ValueError, match="hashable"):
        string_ids([["a"], ["b"]])


def test_whole_groups_pass():
    require_whole_groups(torch.tensor([3, 3, 7, 7]), 2)


def test_split_group_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"group 7 has 1 responses .* expected 2"):
        require_whole_groups(torch.tensor([3, 3, 7]), 2)
    with pytest.raises(ValueError, match=r"prompt 5 has 3 responses .* expected 2"):
        require_whole_groups(torch.tensor([5, 5, 5, 1, 1]), 2, name="prompt")


@pytest.mark.parametrize("ids,size,match", [
    (torch.tensor([0.0, 0.0]), 2, "integer"),
    (torch.tensor([[0, 0]]), 2, "1-D"),
    (torch.tensor([0, 0]), 0, "expected_size"),
])
def test_whole_groups_bad_input(ids, size, match):
    with pytest.raises(ValueError, match=match):
        require_whole_groups(ids, size)


def test_integrations_package_imports_no_trainer():
    code = "import sys, fiberpo_theory.integrations; print('verl' in sys.modules, 'trl' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_split_group_is_named_by_its_label():
    labels = ["q-a", "q-b"]
    with pytest.raises(ValueError, match=r"group 'q-b' has 1 responses"):
        require_whole_groups(string_ids(["q-a", "q-a", "q-b"]), 2, labels=labels)
