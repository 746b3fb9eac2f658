"""The quality benchmark (scripts/bench_quality.py): its metered teacher, paired statistics,
seed extension, Knockoff's natural pool, and `--quick` end to end on a tiny grid with resume."""

import json

import numpy as np
import pytest

from aspkd_ray.quality.cell import Meter
from aspkd_ray.quality.runner import SPREAD, check_budgets, spread_blocks
from aspkd_ray.quality.stats import paired_diff
from aspkd_ray.teacher.errors import BudgetExhausted


def test_meter_charges_each_image_once_and_refuses_past_the_budget():
    answers = np.eye(5, dtype=np.float32)[[0, 1, 2, 3, 4, 0, 1, 2]]
    meter = Meter(answers, budget=4, output="soft")
    assert np.array_equal(meter(np.array([0, 1, 1])), answers[[0, 1, 1]])
    assert meter.calls_used == 2
    meter(np.array([1, 0]))  # asked again: free
    assert meter.calls_used == 2
    with pytest.raises(BudgetExhausted, match="budget of 4"):
        meter(np.array([2, 3, 4]))  # three new ones, two left: refused whole
    assert meter.calls_used == 2
    meter(np.array([2, 3]))
    assert meter.calls_used == 4
    with pytest.raises(ValueError, match="train-pool labels only"):
        meter(np.array([5]), "val")


def test_paired_diff_pairs_by_seed():
    a = {0: 50.0, 1: 60.0, 2: 70.0, 7: 99.0}
    b = {0: 40.0, 1: 52.0, 2: 58.0}       # seed 7 has no partner: left out
    d = paired_diff(a, b)
    assert d.n == 3 and d.mean == pytest.approx(10.0)
    assert 8.0 <= d.low <= d.mean <= d.high <= 12.0 and d.distinguishable
    noisy = paired_diff({0: 1.0, 1: -1.0, 2: 2.0}, {0: 0.0, 1: 0.0, 2: 0.0})
    assert noisy.low < 0 < noisy.high and not noisy.distinguishable
    assert paired_diff({0: 1.0}, {1: 1.0}) is None


def test_spread_blocks_names_the_budgets_whose_seeds_disagree():
    rows = [{"scenario": "s", "method": m, "calls_per_class": b, "seed": seed, "agreement": v}
            for m, b, values in [("aspkd", 1, [10, 20, 30]), ("aspkd", 8, [90, 91, 90]),
                                 ("prompt_only", None, [50, 50 + SPREAD * 3, 50]),
                                 ("vanilla", 8, [80, 80, 80 + SPREAD * 1.5])]
            for seed, v in enumerate(values)]
    assert spread_blocks(rows, "s", (0, 1, 2)) == {1, None}
    assert spread_blocks(rows, "s", (0,)) == set()  # one seed has no spread
    assert spread_blocks(rows, "other", (0, 1, 2)) == set()


def test_check_budgets_flags_any_cell_over_its_budget():
    ok = {"calls_used": 10, "budget": 10}
    assert check_budgets([ok]) == []
    assert check_budgets([ok, {"calls_used": 11, "budget": 10}]) == [
        {"calls_used": 11, "budget": 10}]


def test_natural_pool_is_framed_like_mnist():
    from aspkd_ray.quality.scenario import natural_pool

    images = natural_pool(28, 1)
    assert images.shape == (1797, 28, 28, 1) and images.dtype == np.uint8
    border = np.concatenate([images[:, :4].ravel(), images[:, -4:].ravel(),
                             images[:, :, :4].ravel(), images[:, :, -4:].ravel()])
    assert border.max() == 0 and images[:, 4:24, 4:24].mean() > 20


@pytest.fixture(scope="module")
def tiny(tiny_digits):
    root, sets = tiny_digits
    return root, [a for s in sets for a in ("--set", s)]


def test_quick_grid_end_to_end_and_resume(ray_session, tiny, capsys):
    from aspkd_ray.quality.methods import method_names
    from aspkd_ray.quality.runner import main

    root, sets = tiny
    out = root / "out"
    args = ["--quick", "--scenarios", "digits", "--budgets", "2", "--seeds", "0", "1",
            "--output-dir", str(out), *sets]
    assert main(args) == 0
    saved = json.loads((out / "quality.json").read_text())
    rows = saved["rows"]
    budgeted = [m for m in method_names(grid_only=True)
                if m not in ("prompt_only", "teacher_all")]
    assert len(rows) == 2 * (len(budgeted) + 2)  # 2 seeds x (1 budget x methods + 2)
    for r in rows:
        assert set(r) >= {"scenario", "method", "output", "calls_per_class", "seed",
                          "agreement", "calls_used", "pseudo_label_agreement", "filter_rate"}
        expected = {"prompt_only": 0, "teacher_all": r["budget"]}.get(
            r["method"], 10 * (r["calls_per_class"] or 0))
        assert r["calls_used"] == r["budget"] == expected, r
        assert r["output"] == ("hard" if r["method"].endswith("_hard") else "soft")
        if r["method"] in ("aspkd", "self_paced", "aspkd_hard", "aspkd_plain"):
            assert r["pseudo_label_agreement"] is not None and 0 <= r["filter_rate"] <= 1
    assert saved["scenarios"]["digits"]["victim_test_accuracy"] > 30
    md = (out / "quality.md").read_text()
    assert "## digits" in md and "| 2 |" in md and "calls used ≤ budget: 20 of 20" in md
    for png in ("quality.png", "quality_pseudo.png"):
        assert (out / png).stat().st_size > 10_000

    # Resume: drop two rows; the rerun makes exactly those again, with the same values.
    gone = [r for r in rows if r["seed"] == 1 and r["method"] in ("aspkd", "vanilla")
            and r["calls_per_class"] == 2]
    saved["rows"] = [r for r in rows if r not in gone]
    (out / "quality.json").write_text(json.dumps(saved))
    assert main(args) == 0
    again = json.loads((out / "quality.json").read_text())["rows"]
    kept = [r for r in rows if r not in gone]
    assert again[:len(kept)] == kept  # untouched, in their order

    def timeless(r):
        return json.dumps({k: v for k, v in r.items() if k != "wall_s"}, sort_keys=True)

    assert sorted(map(timeless, again[len(kept):])) == sorted(map(timeless, gone))

    assert main([*args, "--set", "training.lr=0.01"]) == 2  # other settings: refused
    assert "--fresh" in capsys.readouterr().err
    (out / "quality.md").unlink()
    assert main(["--report-only", "--output-dir", str(out)]) == 0
    assert (out / "quality.md").read_text() == md


def test_extra_seeds_add_each_cell_once():
    from aspkd_ray.quality.runner import extra_cells

    rows = [{"scenario": "s", "method": "aspkd", "calls_per_class": 1, "seed": seed,
             "agreement": v} for seed, v in enumerate([10, 20, 30])]
    cells = extra_cells(rows, ["s"], ["aspkd", "vanilla", "prompt_only"], (1, 8), (0, 1, 2),
                        (3, 4))
    keys = [c.key for c in cells]
    assert len(keys) == len(set(keys)) == 6  # 2 methods at budget 1 + prompt_only, 2 seeds
    assert {c.calls_per_class for c in cells} == {1, None}
    assert extra_cells(rows, ["s"], ["aspkd"], (1,), (0, 1, 2), ()) == []


def test_rows_of_a_changed_scenario_config_are_refused(tmp_path):
    from aspkd_ray.errors import UserError
    from aspkd_ray.quality.runner import Results

    results = Results(tmp_path / "quality.json", {"overrides": []},
                      {"s": {"config_hash": "aaa"}}, [{"scenario": "s"}])
    results.check_scenario("s", "aaa")   # the same config: rows continue
    results.check_scenario("t", "bbb")   # another scenario: nothing to mix with
    with pytest.raises(UserError, match="s rows made with another config.*--fresh"):
        results.check_scenario("s", "bbb")
