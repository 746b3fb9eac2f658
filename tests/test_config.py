from pathlib import Path

import pytest

from aspkd_ray.config import ConfigError, from_dict, load, num_rounds, total_budget

ALL = sorted(Path(__file__).resolve().parents[1].joinpath("tune_configs").rglob("*.yaml"))
CONFIGS = [p for p in ALL if not p.name.startswith("sweep-")]
SWEEPS = [p for p in ALL if p.name.startswith("sweep-")]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load(path)
    assert cfg.dataset.name


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_shipped_sweeps_load(path):
    from aspkd_ray.sweep.tune import load_sweep

    spec = load_sweep(path)
    assert spec.space and spec.num_trials() >= 1


def test_sweep_with_a_bad_key_is_rejected(tmp_path):
    from aspkd_ray.sweep.tune import load_sweep

    (tmp_path / "base.yaml").write_text("seed: 1\n")
    (tmp_path / "s.yaml").write_text("base: base.yaml\nsweep:\n  space:\n"
                                     "    aspkd.sigmaa: {grid: [1, 2]}\n")
    with pytest.raises(ConfigError, match="aspkd.sigmaa"):
        load_sweep(tmp_path / "s.yaml")


def test_overrides_apply_with_yaml_types():
    cfg = from_dict({}, ["aspkd.sigma=3", "aspkd.selection=random", "budget.total=80",
                         "generator.templates=['a {class}']"])
    assert cfg.aspkd.sigma == 3.0 and cfg.aspkd.selection == "random"
    assert cfg.budget.total == 80 and cfg.generator.templates == ["a {class}"]


@pytest.mark.parametrize("override, key", [
    ("aspkd.sigmaa=1", "aspkd.sigmaa"),
    ("aspkd.sigma=-1", "aspkd.sigma"),
    ("aspkd.k=0", "aspkd.k"),
    ("victim.output=medium", "victim.output"),
    ("training.lr=fast", "training.lr"),
    ("training.lr=nan", "training.lr"),
    ("aspkd.sigma=.inf", "aspkd.sigma"),
    ("training.max_epochs=2.5", "training.max_epochs"),
    ("aspkd.active=maybe", "aspkd.active"),
    ("aspkd.selection=clever", "aspkd.selection"),
    ("student.architecture=resnet1", "student.architecture"),
    ("nosuchsection.x=1", "nosuchsection"),
    ("generator.templates=['no placeholder']", "generator.templates[0]"),
    ("budget.calls_per_class=-3", "budget.calls_per_class"),
])
def test_bad_values_are_rejected_naming_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        from_dict({}, [override])
    assert key in str(err.value)


def test_error_names_value_and_accepted_choices():
    with pytest.raises(ConfigError, match=r"'medium'.*soft, hard"):
        from_dict({"victim": {"output": "medium"}})


def test_unknown_key_in_yaml_file_is_rejected(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("aspkd:\n  sigma: 1\n  rounds_: 3\n")
    with pytest.raises(ConfigError, match="aspkd.rounds_"):
        load(p)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load(tmp_path / "nope.yaml")


def test_budget_and_rounds_derive_from_calls_per_class():
    assert total_budget(from_dict({}, ["budget.calls_per_class=8"]), 10) == 80
    assert total_budget(from_dict({}, ["budget.total=33"]), 10) == 33
    assert num_rounds(from_dict({}, ["budget.calls_per_class=1"]), 10) == 1
    assert num_rounds(from_dict({}, ["budget.calls_per_class=2"]), 10) == 2
    assert num_rounds(from_dict({}, ["budget.calls_per_class=8"]), 10) == 3
    assert num_rounds(from_dict({}, ["aspkd.rounds=5"]), 10) == 5


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("training:\n  lr: 6e-4\n")  # PyYAML reads this as a string
    assert load(p).training.lr == 6e-4


def test_relative_paths_become_absolute(tmp_path, monkeypatch):
    # Ray workers run in other directories: every local path must be absolute after loading.
    monkeypatch.chdir(tmp_path)
    cfg = from_dict({}, ["cache_dir=.cache", "output_dir=runs/x", "budget.ledger=led",
                         "generator.model=some-org/some-model"])
    assert cfg.cache_dir == str(tmp_path / ".cache")
    assert cfg.output_dir == str(tmp_path / "runs" / "x")
    assert cfg.budget.ledger == str(tmp_path / "led")
    assert cfg.generator.model == "some-org/some-model"  # a hub id stays as it is
    assert from_dict({}, ["budget.ledger=s3://b/l"]).budget.ledger == "s3://b/l"


@pytest.mark.parametrize("active, selection", [(True, "paper"), (False, "random")])
def test_deprecated_active_maps_to_a_selection_strategy(active, selection, caplog):
    cfg = from_dict({}, [f"aspkd.active={str(active).lower()}"])
    assert cfg.aspkd.selection == selection and cfg.aspkd.active is None
    assert "deprecated" in caplog.text


def test_active_contradicting_selection_is_refused():
    with pytest.raises(ConfigError, match="aspkd.active"):
        from_dict({}, ["aspkd.active=true", "aspkd.selection=random"])


def test_every_registered_selection_strategy_honours_its_contract():
    """Each strategy picks exactly the quota, among the candidates, the same per class as
    far as the classes allow, and the same picks for the same seed."""
    import numpy as np

    from aspkd_ray.aspkd.selection import SelectionInput, get_selection, list_selections

    rng = np.random.default_rng(0)
    latents, classes = rng.normal(size=(60, 4)), np.arange(60) % 3
    probabilities = rng.dirichlet(np.ones(3), size=60)
    candidates = np.arange(5, 60)
    settings = from_dict({}, []).aspkd
    assert {"paper", "random"} <= set(list_selections())
    for name in list_selections():
        def run(seed, name=name):
            return get_selection(name)(SelectionInput(
                quota=9, classes=classes, candidates=candidates, num_classes=3,
                rng=np.random.default_rng(seed), latents=lambda: latents,
                predicted=lambda: classes, settings=settings,
                probabilities=lambda: probabilities)).indices
        picks = run(1)
        assert len(picks) == 9 and len(set(picks)) == 9, name
        assert set(picks) <= set(candidates), name
        assert list(np.bincount(classes[picks], minlength=3)) == [3, 3, 3], name
        assert list(run(1)) == list(picks), name


def test_dataset_horizontal_flip_overrides_the_data_set_default():
    from aspkd_ray.layout import horizontal_flip

    assert horizontal_flip(from_dict({}, ["dataset.name=imagefolder"])) is True
    assert horizontal_flip(from_dict({}, ["dataset.name=imagefolder",
                                          "dataset.horizontal_flip=false"])) is False
    assert horizontal_flip(from_dict({}, [])) is False  # digits


def test_every_registered_pseudo_label_rule_honours_its_contract():
    """Each rule labels every query (soft: distributions, hard: class ids), says which it
    keeps, and a query sitting on a reference gets that reference's class."""
    import numpy as np

    from aspkd_ray.aspkd.pseudo_labels import (
        PseudoLabelInput,
        get_pseudo_label_rule,
        list_pseudo_label_rules,
    )

    rng = np.random.default_rng(0)
    reference = rng.normal(size=(12, 6)).astype(np.float32)
    ref_classes = np.arange(12) % 3
    query = np.concatenate([reference + 1e-4, rng.normal(size=(8, 6)).astype(np.float32)])
    gen = np.concatenate([ref_classes, rng.integers(0, 3, 8)])
    settings = from_dict({}, ["aspkd.k=1"]).aspkd
    assert "paper" in list_pseudo_label_rules()
    for name in list_pseudo_label_rules():
        for mode, labels in (("soft", np.eye(3, dtype=np.float32)[ref_classes]),
                             ("hard", ref_classes)):
            out = get_pseudo_label_rule(name)(PseudoLabelInput(
                query=query, reference=reference, reference_labels=labels,
                generation_classes=gen, mode=mode, num_classes=3, distance="euclidean",
                settings=settings))
            assert out.classes.shape == (20,) and out.kept.shape == (20,), (name, mode)
            if mode == "soft":
                np.testing.assert_allclose(out.labels.sum(1), 1.0, atol=1e-5)
            else:
                assert out.labels.dtype.kind == "i"
            assert list(out.classes[:12]) == list(ref_classes), (name, mode)
            assert out.kept[:12].all(), (name, mode)
