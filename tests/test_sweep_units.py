"""Sweep parts without an attack: the sweep file's checks, trial sizing, seeded searches,
the placement group reaper, and the results files."""

import pytest
import yaml


def _sweep(tmp_path, sweep: dict, base: dict | None = None):
    from aspkd_ray.sweep.spec import load_sweep

    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base or {}))
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({"base": "base.yaml", "sweep": sweep}))
    return load_sweep(tmp_path / "sweep.yaml")


@pytest.mark.parametrize("sweep, match", [
    ({"metric": "agreement", "space": {"aspkd.k": {"grid": [3]}}}, "sweep.objective"),
    ({"objective": "oracle", "space": {"aspkd.k": {"grid": [3]}}}, "attacker, research"),
    ({"search": "hyperopt", "space": {"aspkd.k": {"grid": [3]}}}, "sweep.search"),
    ({"scheduler": "pbt", "space": {"aspkd.k": {"grid": [3]}}}, "sweep.scheduler"),
    ({"search": "optuna", "space": {"aspkd.k": {"grid": [3, 5]}}}, "use choice"),
    ({"asha": {"grace": 1}, "space": {"aspkd.k": {"grid": [3]}}}, "sweep.asha.grace"),
    ({"val_per_class": 0, "space": {"aspkd.k": {"grid": [3]}}}, "sweep.val_per_class"),
    ({"space": {"aspkd.k": {"grid": [0]}}}, "aspkd.k"),
    ({"space": {}}, "sweep.space"),
])
def test_bad_sweep_files_name_the_key(tmp_path, sweep, match):
    from aspkd_ray.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        _sweep(tmp_path, sweep)


def test_defaults_and_trial_count(tmp_path):
    spec = _sweep(tmp_path, {"num_samples": 2, "space": {"aspkd.k": {"grid": [3, 5]},
                                                         "training.lr": {"choice": [0.1]}}})
    assert (spec.objective, spec.metric, spec.search, spec.scheduler) == (
        "attacker", "val_agreement", "basic", "fifo")
    assert spec.num_trials() == 4
    research = _sweep(tmp_path, {"objective": "research", "search": "optuna",
                                 "num_samples": 3, "space": {"aspkd.k": {"choice": [3, 5]}}})
    assert research.metric == "agreement" and research.num_trials() == 3


@pytest.mark.parametrize("nodes, concurrent", [
    ([{"CPU": 2.0}], 1),                      # this machine
    ([{"CPU": 8.0}], 4),
    ([{"CPU": 0.0}, {"CPU": 4.0}, {"CPU": 4.0}], 4),  # a head without CPUs, two workers
])
def test_trial_workers_fit_the_nodes_side_by_side(tmp_path, nodes, concurrent):
    from aspkd_ray.config import from_dict
    from aspkd_ray.runtime.resources import _fit
    from aspkd_ray.sweep.tune import TRIAL_CPUS, trial_resources

    spec = _sweep(tmp_path, {"space": {"aspkd.k": {"grid": [1, 2, 3, 4, 5]}}})
    got, sets = trial_resources(from_dict({}), spec, nodes)
    per = float(next(s for s in sets if s.startswith("ray.cpus_per_worker=")).split("=")[1])
    assert got == concurrent
    # every concurrent trial's worker has a node, with room for the trials and drivers
    assert _fit(nodes, per, 0.0) >= concurrent
    assert concurrent * (per + TRIAL_CPUS) <= sum(n["CPU"] for n in nodes) - 0.5 + 1e-6


def test_a_worker_no_node_can_hold_fails_up_front(tmp_path):
    from aspkd_ray.config import from_dict
    from aspkd_ray.runtime.resources import ResourceError
    from aspkd_ray.sweep.tune import trial_resources

    spec = _sweep(tmp_path, {"space": {"aspkd.k": {"grid": [3]}}})
    with pytest.raises(ResourceError, match="each sweep trial asks for 1 worker"):
        trial_resources(from_dict({}, ["ray.cpus_per_worker=2.4"]), spec, [{"CPU": 2.0}])


def _configs(search: str, seed: int) -> list[float]:
    from ray import tune

    from aspkd_ray.sweep.search import SEARCHES, search_space

    def trainable(config):
        tune.report({"m": config["x"]})

    space = {"x": {"uniform": [0.0, 1.0]}}
    results = tune.Tuner(trainable, param_space=search_space(space), tune_config=tune.TuneConfig(
        metric="m", mode="max", num_samples=3, search_alg=SEARCHES.get(search)(None, seed, 1)),
        run_config=tune.RunConfig(verbose=0)).fit()
    return sorted(r.config["x"] for r in results)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("search", ["basic", "optuna"])
def test_searches_are_seeded(ray_session, search):
    first = _configs(search, 7)
    assert first == _configs(search, 7)
    assert first != _configs(search, 8)


def test_the_reaper_frees_the_group_of_a_killed_creator(ray_session):
    import time

    import ray
    from ray.util.placement_group import placement_group

    from aspkd_ray.runtime.reaper import orphaned_placement_groups, reap_placement_groups

    @ray.remote(num_cpus=0)
    class Controller:  # stands for a Ray Train controller and its workers' group
        def start(self):
            pg = placement_group([{"CPU": 0.5}])
            ray.get(pg.ready())
            return pg.id.hex()

    mine = placement_group([{"CPU": 0.25}])  # the driver's, as Tune makes for each trial
    ray.get(mine.ready())
    alive = Controller.remote()
    kept = ray.get(alive.start.remote())
    killed = Controller.remote()
    orphan = ray.get(killed.start.remote())
    ray.kill(killed)
    end = time.time() + 30
    while orphan not in [pg.id.hex() for pg in orphaned_placement_groups()]:
        assert time.time() < end, "the killed actor's group never showed as orphaned"
        time.sleep(0.2)
    others = [pg.id.hex() for pg in orphaned_placement_groups()]
    assert kept not in others and mine.id.hex() not in others
    assert reap_placement_groups() == 1
    table = ray.util.placement_group_table()
    assert table[orphan]["state"] == "REMOVED" and table[kept]["state"] == "CREATED"
    assert table[mine.id.hex()]["state"] == "CREATED"
    ray.util.remove_placement_group(mine)
    ray.kill(alive)
    reap_placement_groups()


def test_results_files(tmp_path):
    from aspkd_ray.sweep.results import (
        best_config_yaml,
        plot_parameters,
        rank_rows,
        results_markdown,
    )

    rows = rank_rows([
        {"trial": "a", "aspkd.sigma": 0.5, "val_agreement": 40.0, "agreement": 41.0},
        {"trial": "b", "aspkd.sigma": 2.0, "val_agreement": None, "status": "error"},
        {"trial": "c", "aspkd.sigma": 1.0, "val_agreement": 55.0, "agreement": 50.0,
         "stopped_early": True},
    ], "val_agreement")
    assert [r["trial"] for r in rows] == ["c", "a", "b"]
    md = results_markdown(rows, ["aspkd.sigma"], "attacker", "val_agreement",
                          {"spent": 12, "budget": 20, "validation": 5})
    assert "objective: attacker" in md and "12 of 20 calls" in md and "| c | 1.00 |" in md
    plot_parameters(rows, {"aspkd.sigma": {"loguniform": [0.1, 10]}}, "val_agreement",
                    tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000
    text = best_config_yaml({"aspkd": {"k": 3}, "seed": 1}, ["training.lr=0.01"],
                            {"aspkd.sigma": 1.0}, "best")
    data = yaml.safe_load(text)
    assert data == {"aspkd": {"k": 3, "sigma": 1.0}, "seed": 1, "training": {"lr": 0.01}}
    from aspkd_ray.config import from_dict

    from_dict(data)  # ready to run: a valid config
