"""routing.py: eval mixing weights and task specs against torch, and the routing statistics on
hand-made allocations whose answers are known."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from polytool.core import routing, taskspec
from polytool.errors import PolytoolError


def torch_eval_weights(logits: np.ndarray, n_splits: int, n_skills: int) -> torch.Tensor:
    """PEFT's eval routing, written out in torch: sigmoid, then per-split w / (sum + 1e-12)."""
    w = torch.sigmoid(torch.from_numpy(logits).double()).view(logits.shape[0], n_splits, n_skills)
    return w / (w.sum(-1, keepdim=True) + 1e-12)


@pytest.fixture(scope="module")
def logits() -> np.ndarray:
    return np.random.default_rng(0).normal(scale=3.0, size=(5, 3 * 4)).astype(np.float32)


def test_eval_weights_match_torch(logits):
    got = routing.eval_weights(logits, 3, 4)
    assert got.shape == (5, 3, 4) and got.dtype == np.float64
    np.testing.assert_allclose(got, torch_eval_weights(logits, 3, 4).numpy(), rtol=0, atol=1e-15)
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-10)
    # negative control: tasks route differently, and a softmax would be another (wrong) model
    assert np.abs(got[0] - got[1]).max() > 0.05
    softmax = torch.softmax(torch.from_numpy(logits).double().view(5, 3, 4), -1).numpy()
    assert np.abs(got - softmax).max() > 0.01


def test_sigmoid_extremes_do_not_overflow():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = routing.sigmoid(np.array([-1000.0, -40.0, 0.0, 40.0, 1000.0]))
    np.testing.assert_allclose(out, torch.sigmoid(torch.tensor([-1000.0, -40.0, 0.0, 40.0, 1000.0]).double()).numpy())


def test_spec_weights(logits):
    expected = torch_eval_weights(logits, 3, 4).numpy()
    np.testing.assert_allclose(routing.spec_weights(logits, 3, 4, 2), expected[2], atol=1e-15)
    np.testing.assert_allclose(routing.spec_weights(logits, 3, 4, "mean"), expected.mean(0), atol=1e-15)
    np.testing.assert_array_equal(routing.spec_weights(logits, 3, 4, "uniform"), np.full((3, 4), 0.25))
    assert taskspec.spec_label(2) == "task-2" and taskspec.spec_label("mean") == "mean"


@pytest.mark.parametrize("text, allow_all, expected", [
    ("3", False, 3), (0, False, 0), (" Mean ", False, "mean"), ("UNIFORM", False, "uniform"), ("all", True, "all"),
])
def test_parse_task_spec(text, allow_all, expected):
    assert taskspec.parse_task_spec(text, 4, allow_all=allow_all) == expected


@pytest.mark.parametrize("text, allow_all, message", [
    ("x", False, "invalid task 'x': expected an integer id in [0, 4), one of uniform, mean, or a mix such as 1,3 or 1:0.7,3:0.3"),
    ("all", False, "invalid task 'all': expected an integer id in [0, 4), one of uniform, mean, or a mix such as 1,3 or 1:0.7,3:0.3"),
    ("1.5", True, "invalid task '1.5': expected an integer id in [0, 4), one of uniform, mean, all, or a mix such as 1,3 or 1:0.7,3:0.3"),
    ("4", False, "task 4 is out of range: this adapter has tasks 0..3"),
    ("-1", False, "task -1 is out of range: this adapter has tasks 0..3"),
])
def test_parse_task_spec_errors(text, allow_all, message):
    with pytest.raises(PolytoolError) as err:
        taskspec.parse_task_spec(text, 4, allow_all=allow_all)
    assert str(err.value) == message


# ---- task mixes ----------------------------------------------------------------------------------
@pytest.mark.parametrize("text, tasks, coefficients, canonical", [
    ("1,3", (1, 3), (0.5, 0.5), "1:0.5,3:0.5"),
    ("1:0.7,3:0.3", (1, 3), (0.7, 0.3), "1:0.7,3:0.3"),
    (" 3:3, 1:7 ", (1, 3), (0.7, 0.3), "1:0.7,3:0.3"),  # sorted by task, normalised to sum to 1
    ("0:1,1:1,2:2", (0, 1, 2), (0.25, 0.25, 0.5), "0:0.25,1:0.25,2:0.5"),
])
def test_parse_task_mix(text, tasks, coefficients, canonical):
    mix = taskspec.parse_task_spec(text, 4)
    assert isinstance(mix, taskspec.TaskMix) and mix.tasks == tasks and str(mix) == canonical
    np.testing.assert_allclose(mix.coefficients, coefficients, rtol=1e-15)
    assert taskspec.parse_task_spec(str(mix), 4) == mix  # the canonical form reads back to itself
    assert taskspec.spec_label(mix) == canonical


def test_a_mix_of_one_task_is_that_task():
    assert taskspec.parse_task_spec("2:0.4", 4) == 2


@pytest.mark.parametrize("text, message", [
    ("1,x", "invalid task mix '1,x': expected TASK,TASK,... (equal weights) or TASK:WEIGHT,TASK:WEIGHT,... e.g. 1:0.7,3:0.3"),
    ("1:0.5,3", "invalid task mix '1:0.5,3': expected TASK,TASK,... (equal weights) or TASK:WEIGHT,TASK:WEIGHT,... e.g. 1:0.7,3:0.3"),
    ("1:0.5,3:-1", "invalid task mix '1:0.5,3:-1': every weight must be a finite number > 0"),
    ("1:0,3:1", "invalid task mix '1:0,3:1': every weight must be a finite number > 0"),
    ("1:nan,3:1", "invalid task mix '1:nan,3:1': every weight must be a finite number > 0"),
    ("1,1", "invalid task mix '1,1': a task appears twice"),
    ("1,4", "task 4 is out of range: this adapter has tasks 0..3"),
])
def test_parse_task_mix_errors(text, message):
    with pytest.raises(PolytoolError) as err:
        taskspec.parse_task_spec(text, 4)
    assert str(err.value) == message


def test_mix_weights_are_the_mix_of_eval_weights(logits):
    expected = torch_eval_weights(logits, 3, 4).numpy()  # (t, q, s)
    mix = taskspec.parse_task_spec("1:0.7,3:0.3", 5)
    got = routing.spec_weights(logits, 3, 4, mix)
    np.testing.assert_allclose(got, 0.7 * expected[1] + 0.3 * expected[3], rtol=1e-14)
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-11)  # still per-split normalised: a routed task's weights
    # negative control: the other weighting differs
    assert np.abs(got - routing.spec_weights(logits, 3, 4, taskspec.parse_task_spec("1:0.3,3:0.7", 5))).max() > 0.01
    # logits logit(w / 2) route exactly as the mix (what a PEFT router set to the mix computes)
    w2 = torch.from_numpy(got / 2)
    back = torch_eval_weights(torch.logit(w2).reshape(1, -1).numpy(), 3, 4).numpy()[0]
    np.testing.assert_allclose(back, got, rtol=1e-10)


# ---- statistics --------------------------------------------------------------------------------
def one_split(rows: list[list[float]]) -> np.ndarray:
    """A hand-made (t, s) allocation as (t, q=1, s)."""
    return np.asarray(rows, dtype=np.float64)[:, None, :]


def test_fully_discrete_allocation():
    alloc = one_split([[1, 0, 1, 0], [0, 1, 0, 0], [1, 1, 0, 0]])
    assert routing.discreteness(alloc).tolist() == [0.0]
    assert routing.sparsity(alloc)[0] == pytest.approx(7 / 12)  # seven zeros of twelve entries
    # column sums 2, 2, 1, 0 -> shares .4 .4 .2 0
    shares = np.array([0.4, 0.4, 0.2])
    assert routing.skill_usage(alloc)[0] == pytest.approx(-(shares * np.log(shares)).sum() / math.log(4))
    assert routing.unused_skills(alloc) == [[3]]


def test_uniform_allocation():
    alloc = np.full((3, 2, 5), 0.5)  # what PEFT's near-zero initial logits give
    np.testing.assert_allclose(routing.discreteness(alloc), [1.0, 1.0])
    np.testing.assert_array_equal(routing.sparsity(alloc), [0.0, 0.0])  # 0.5 rounds to 1
    np.testing.assert_allclose(routing.skill_usage(alloc), [1.0, 1.0])
    assert routing.unused_skills(alloc) == [[], []]


def test_one_unused_skill_and_per_split_values():
    split0 = [[0.9, 0.2, 0.8], [0.7, 0.4, 0.6]]  # skill 1 below 0.5 for every task
    split1 = [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]  # fully discrete, skill 1 unused
    alloc = np.stack([np.asarray(split0), np.asarray(split1)], axis=1)  # (t=2, q=2, s=3)
    assert routing.unused_skills(alloc) == [[1], [1]]
    np.testing.assert_allclose(routing.sparsity(alloc), [2 / 6, 4 / 6])
    assert routing.discreteness(alloc)[1] == 0.0 and 0 < routing.discreteness(alloc)[0] < 1
    assert routing.skill_usage(alloc)[1] == pytest.approx(math.log(2) / math.log(3))
    # one task keeps a skill alive: no longer unused
    alloc[1, 0, 1] = 0.5
    assert routing.unused_skills(alloc)[0] == []


def test_statistics_match_torch_distributions(logits):
    """The definitions as the Polytropon authors' code computes them (torch.distributions)."""
    alloc = routing.allocation(logits, 3, 4)
    z = torch.from_numpy(logits).double().view(5, 3, 4)
    np.testing.assert_allclose(alloc, torch.sigmoid(z).numpy(), atol=1e-15)
    for q in range(3):
        zq, pq = z[:, q], torch.sigmoid(z[:, q])
        disc = torch.distributions.Bernoulli(logits=zq).entropy().mean() / math.log(2)
        cols = pq.mean(0) / pq.mean(0).sum()
        usage = torch.distributions.Categorical(probs=cols).entropy() / math.log(4)
        assert routing.discreteness(alloc)[q] == pytest.approx(disc.item(), abs=1e-12)
        assert routing.sparsity(alloc)[q] == pytest.approx(1 - (pq + 0.5).floor().mean().item(), abs=1e-12)
        assert routing.skill_usage(alloc)[q] == pytest.approx(usage.item(), abs=1e-12)


def test_single_skill_usage_is_one():
    np.testing.assert_array_equal(routing.skill_usage(np.full((3, 2, 1), 0.3)), [1.0, 1.0])


def test_effective_skills_and_cosine():
    np.testing.assert_allclose(routing.effective_skills(np.array([[0.25] * 4, [1.0, 0, 0, 0]])), [4.0, 1.0])
    x = np.random.default_rng(1).random((4, 7))
    expected = torch.nn.functional.cosine_similarity(
        torch.from_numpy(x)[:, None, :], torch.from_numpy(x)[None, :, :], dim=-1).numpy()
    np.testing.assert_allclose(routing.cosine_similarity(x), expected, atol=1e-12)
    assert routing.cosine_similarity(np.zeros((2, 3))).tolist() == [[0.0, 0.0], [0.0, 0.0]]


def test_inspect_task_weights_of_a_mix():
    """`inspect --task 1:0.7,3:0.3 --json` adds the mix's weights per module: the mix of the report's own
    per-task weights (which tests/test_inspect.py checks against torch); another mix differs."""
    import json
    from pathlib import Path

    from click.testing import CliRunner

    from polytool.cli import main

    fixture = Path(__file__).resolve().parent.parent / "fixtures" / "mhr"
    report = lambda *a: json.loads(CliRunner().invoke(main, ["inspect", str(fixture), "--json", *a]).stdout)
    plain, mix = report(), report("--task", "3:3,1:7")
    assert "task_weights" not in plain and {k: v for k, v in mix.items() if k != "task_weights"} == plain
    w = np.asarray(plain["routing"]["weights"])  # (t, m, q, s)
    got = mix["task_weights"]
    assert got["task"] == "1:0.7,3:0.3" and list(got["modules"]) == [m["name"] for m in plain["modules"]]
    np.testing.assert_allclose(np.stack(list(map(np.asarray, got["modules"].values()))), 0.7 * w[1] + 0.3 * w[3], rtol=1e-12)
    np.testing.assert_allclose(got["skill_weights"], (0.7 * w[1] + 0.3 * w[3]).mean(axis=(0, 1)), rtol=1e-12)
    other = report("--task", "1:0.3,3:0.7")["task_weights"]["skill_weights"]
    assert np.abs(np.asarray(other) - got["skill_weights"]).max() > 1e-3
    assert report("--task", "2")["task_weights"]["task"] == 2
