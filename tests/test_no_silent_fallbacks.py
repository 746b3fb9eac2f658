"""No silent fallbacks: a broken install, an unexpected error while looking for a Ray head, or a
TypeError inside a diffusion step surfaces; the expected fallbacks say what they do."""

from __future__ import annotations

import logging
import sys
import types

import pytest

# ---- cli: every subcommand module must import -------------------------------------------


def test_a_subcommand_module_that_is_missing_is_an_error(monkeypatch):
    from aspkd_ray.cli import main

    monkeypatch.setattr(main, "COMMANDS", [*main.COMMANDS, "aspkd_ray.cli.no_such_command"])
    with pytest.raises(ImportError, match=r"aspkd_ray\.cli\.no_such_command cannot be imported"):
        main.build_parser()


def test_a_subcommand_whose_dependency_is_missing_is_an_error(monkeypatch, tmp_path):
    from aspkd_ray.cli import main

    (tmp_path / "aspkd_broken_cmd.py").write_text(
        "import aspkd_no_such_dependency  # noqa: F401\n"
        "def register(sub):\n    sub.add_parser('broken')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(main, "COMMANDS", ["aspkd_ray.cli.info", "aspkd_broken_cmd"])
    with pytest.raises(ImportError, match="aspkd_broken_cmd cannot be imported") as err:
        main.build_parser()
    assert "aspkd_no_such_dependency" in str(err.value)  # the real cause is named
    assert isinstance(err.value.__cause__, ModuleNotFoundError)
    sys.modules.pop("aspkd_broken_cmd", None)


def test_every_shipped_subcommand_registers():
    from aspkd_ray.cli import main

    sub = next(a for a in main.build_parser()._actions
               if isinstance(a.choices, dict) and "steal" in a.choices)
    shipped = {"info", "train-teacher", "generate", "serve-victim", "steal", "sweep"}
    assert shipped <= set(sub.choices)


# ---- ray_connect: only "no head here" falls back to an embedded Ray ---------------------

@pytest.fixture
def head_probe(monkeypatch):
    """Replace Ray's private helpers that local_head_address uses: (record, live) -> None."""
    import ray._private.services as services
    import ray._private.utils as utils

    def set_probe(recorded, live):
        def read():
            if isinstance(recorded, BaseException):
                raise recorded
            return recorded

        def find():
            if isinstance(live, BaseException):
                raise live
            return frozenset(live)

        monkeypatch.setattr(utils, "read_ray_address", read)
        monkeypatch.setattr(services, "find_gcs_addresses", find)

    return set_probe


def test_a_live_local_head_is_joined(head_probe):
    from aspkd_ray.runtime.ray_connect import local_head_address

    head_probe("10.0.0.1:6379", {"10.0.0.1:6379"})
    assert local_head_address() == "10.0.0.1:6379"


def test_no_head_and_a_stale_record_are_no_head(head_probe, caplog):
    from aspkd_ray.runtime.ray_connect import local_head_address

    head_probe(None, set())
    assert local_head_address() is None
    head_probe("10.0.0.1:6379", {"10.0.0.2:6379"})
    with caplog.at_level(logging.INFO, logger="aspkd_ray.runtime.ray_connect"):
        assert local_head_address() is None
    assert "recorded at 10.0.0.1:6379 but none is running" in caplog.text


def test_an_unreadable_record_falls_back_with_a_warning(head_probe, caplog):
    from aspkd_ray.runtime.ray_connect import local_head_address

    head_probe(PermissionError("/tmp/ray/ray_current_cluster"), set())
    with caplog.at_level(logging.WARNING, logger="aspkd_ray.runtime.ray_connect"):
        assert local_head_address() is None
    assert "cannot read the local Ray head's address" in caplog.text


@pytest.mark.parametrize("where", ["record", "processes"])
def test_an_unexpected_error_while_probing_propagates(head_probe, where):
    from aspkd_ray.runtime.ray_connect import local_head_address

    boom = RuntimeError("unexpected probe failure")
    head_probe(boom if where == "record" else "10.0.0.1:6379",
               boom if where == "processes" else set())
    with pytest.raises(RuntimeError, match="unexpected probe failure"):
        local_head_address()


def test_connect_says_when_it_starts_an_embedded_ray(monkeypatch, caplog):
    import ray

    from aspkd_ray.runtime import ray_connect

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setattr(ray, "get_runtime_context",
                        lambda: types.SimpleNamespace(gcs_address="fake:1"))
    monkeypatch.setattr(ray_connect, "describe", lambda: {"address": "fake:1"})
    monkeypatch.setattr(ray_connect, "local_head_address", lambda: None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with caplog.at_level(logging.INFO, logger="aspkd_ray.runtime.ray_connect"):
        ray_connect.connect()
    assert calls[0]["address"] == "local"
    assert "starting an embedded Ray" in caplog.text
    caplog.clear()
    monkeypatch.setattr(ray_connect, "local_head_address", lambda: "10.0.0.1:6379")
    with caplog.at_level(logging.INFO, logger="aspkd_ray.runtime.ray_connect"):
        ray_connect.connect()
    assert calls[1]["address"] == "10.0.0.1:6379"
    assert "embedded" not in caplog.text

    def broken():
        raise RuntimeError("unexpected probe failure")

    monkeypatch.setattr(ray_connect, "local_head_address", broken)
    with pytest.raises(RuntimeError, match="unexpected probe failure"):
        ray_connect.connect()
    assert len(calls) == 2  # no Ray started after the error


# ---- ddpm: a TypeError inside a scheduler step is not retried without the generator ------

class _NoGenerator:
    def step(self, model_output, timestep, sample, return_dict=True):
        return types.SimpleNamespace(prev_sample=sample - model_output)


class _Generator:
    def __init__(self):
        self.got = None

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        self.got = generator
        return types.SimpleNamespace(prev_sample=sample + model_output)


class _BrokenInside(_Generator):
    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        raise TypeError("a bug inside step")


def _bare_generator(scheduler):
    """A DDPMGenerator without a model folder: only what _step uses."""
    from aspkd_ray.generation.ddpm import DDPMGenerator, step_takes_generator

    gen = DDPMGenerator.__new__(DDPMGenerator)
    gen.scheduler = scheduler
    gen._step_takes_generator = step_takes_generator(scheduler)
    return gen


def test_ddpm_step_passes_the_generator_only_where_step_takes_it():
    import torch

    from aspkd_ray.generation.ddpm import sampling_scheduler, step_takes_generator, train_scheduler

    out, x, gens = torch.ones(2, 1, 4, 4), torch.zeros(2, 1, 4, 4), ["g0", "g1"]
    with_gen = _Generator()
    assert torch.equal(_bare_generator(with_gen)._step(out, 0, x, gens), x + out)
    assert with_gen.got == gens
    assert torch.equal(_bare_generator(_NoGenerator())._step(out, 0, x, gens), x - out)
    # The schedulers offered by generator.scheduler all take the seeded generator.
    config = dict(train_scheduler().config)
    for name in ("ddim", "ddpm", "dpm", "euler"):
        assert step_takes_generator(sampling_scheduler(name, config)), name


def test_ddpm_a_type_error_inside_a_step_surfaces():
    import torch

    gen = _bare_generator(_BrokenInside())
    with pytest.raises(TypeError, match="a bug inside step"):
        gen._step(torch.ones(1, 1, 4, 4), 0, torch.zeros(1, 1, 4, 4), ["g"])
