"""Nothing runs code from a results folder: resume files are data, planted pickles are refused.

Each test plants a pickle whose unpickling would create a marker file where the resume code
reads, calls the real loading code, and checks that the marker never appears and that the
error names the file.
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from aspkd_ray.aspkd.rounds import AttackState
from aspkd_ray.errors import UserError
from aspkd_ray.models import create_model
from aspkd_ray.train.attack import _save, load_round_checkpoint
from aspkd_ray.train.state_io import (
    LEGACY_STATE,
    STATE_ARRAYS,
    STATE_JSON,
    STUDENT_FILE,
    StateFileError,
    load_state,
    save_state,
)


class Payload:
    """Unpickling this opens (creates) `marker`: code run from data."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _state(soft: bool = True) -> AttackState:
    rng = np.random.default_rng(0)
    labels = (rng.dirichlet(np.ones(10), 6).astype(np.float32) if soft
              else rng.integers(0, 10, 6).astype(np.int64))
    return AttackState(
        round=2,
        bought_idx=np.array([5, 1, 9, 2, 7, 3], np.int64),
        bought_labels=labels,
        history=[{"round": 0, "bought": 3, "bought_this_round": 3,
                  "val_score_labelled": 0.5, "epochs_labelled": 2, "pseudo_labelled": 4,
                  "filter_rate": np.float64(0.25), "val_score": float("-inf"),
                  "epochs_all": np.int64(1), "round_time_s": 0.12},
                 {"round": 1, "bought": 6, "val_score": float("nan"), "note": "x"}],
        pseudo=[{"round": 0, "idx": np.array([0, 4, 8], np.int64),
                 "classes": np.array([1, 2, 3], np.int64)},
                {"round": 1, "idx": np.zeros(0, np.int64), "classes": np.zeros(0, np.int64)}],
        pretrain={"val_score": 0.75, "epochs": 3},
    )


def _same(a, b) -> None:
    """Equal values and types; arrays with the same dtype; NaN equal to NaN."""
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _same(x, y)
    elif isinstance(a, float) and np.isnan(a):
        assert isinstance(b, float) and np.isnan(b)
    else:
        assert a == b and type(b) is type(a.item() if isinstance(a, np.generic) else a)


@pytest.mark.parametrize("soft", [True, False])
def test_attack_state_round_trip_is_exact(tmp_path, soft):
    state = _state(soft)
    save_state(state, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_JSON, STATE_ARRAYS]
    back = load_state(tmp_path)
    for field in ("round", "bought_idx", "bought_labels", "history", "pseudo", "pretrain"):
        _same(getattr(state, field), getattr(back, field))
    # numpy scalars became plain JSON numbers
    assert type(back.history[0]["filter_rate"]) is float
    assert type(back.history[0]["epochs_all"]) is int


def test_fresh_state_round_trips(tmp_path):
    save_state(AttackState(), tmp_path)
    back = load_state(tmp_path)
    assert back.round == 0 and back.bought_labels is None and back.pretrain is None
    assert back.bought_idx.dtype == np.int64 and len(back.bought_idx) == 0


def test_round_checkpoint_has_no_pickle_and_loads(tmp_path):
    torch.manual_seed(0)
    model = create_model("digits_cnn_small", num_classes=10, in_chans=1, image_size=28)
    _save(_state(), model, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {STATE_JSON, STATE_ARRAYS, STUDENT_FILE}
    state, weights = load_round_checkpoint(tmp_path)
    assert state.round == 2
    for k, v in model.state_dict().items():
        torch.testing.assert_close(weights[k], v, rtol=0, atol=0)


def _plant_pickle(path, marker) -> None:
    path.write_bytes(pickle.dumps(Payload(marker)))


def test_the_payload_is_live(tmp_path):
    # The planted files below are real attacks: loading them as pickles creates the marker.
    marker = tmp_path / "pwned"
    _plant_pickle(tmp_path / "x.pkl", marker)
    pickle.loads((tmp_path / "x.pkl").read_bytes()).close()
    assert marker.exists()
    marker.unlink()
    torch.save({"key": Payload(marker)}, tmp_path / "x.pt")
    torch.load(tmp_path / "x.pt", weights_only=False)["key"].close()
    assert marker.exists()


def test_legacy_pickle_state_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "checkpoint_000001"
    ckpt.mkdir()
    _plant_pickle(ckpt / LEGACY_STATE, marker)
    with pytest.raises(StateFileError, match="old pickle format") as err:
        load_round_checkpoint(ckpt)
    assert str(ckpt / LEGACY_STATE) in str(err.value) and "delete" in str(err.value)
    assert isinstance(err.value, UserError)
    assert not marker.exists()


def test_pickle_beside_the_new_files_is_never_read(tmp_path):
    marker = tmp_path / "pwned"
    model = create_model("digits_cnn_small", num_classes=10, in_chans=1, image_size=28)
    _save(_state(), model, tmp_path)
    _plant_pickle(tmp_path / LEGACY_STATE, marker)
    state, _ = load_round_checkpoint(tmp_path)
    assert state.round == 2 and not marker.exists()


@pytest.mark.parametrize("target", [STATE_JSON, STATE_ARRAYS, STUDENT_FILE])
def test_planted_pickle_in_place_of_a_checkpoint_file_is_refused(tmp_path, target):
    marker = tmp_path.parent / f"pwned-{tmp_path.name}"
    model = create_model("digits_cnn_small", num_classes=10, in_chans=1, image_size=28)
    _save(_state(), model, tmp_path)
    _plant_pickle(tmp_path / target, marker)
    with pytest.raises(StateFileError) as err:
        load_round_checkpoint(tmp_path)
    assert target in str(err.value) and "delete" in str(err.value)
    assert not marker.exists()


def test_npz_with_a_pickled_object_array_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    save_state(_state(), tmp_path)
    arrays = dict(np.load(tmp_path / STATE_ARRAYS))
    obj = np.empty(1, dtype=object)
    obj[0] = Payload(marker)
    arrays["bought_idx"] = obj  # np.save pickles object arrays
    with open(tmp_path / STATE_ARRAYS, "wb") as fh:
        np.savez(fh, **arrays)
    with pytest.raises(StateFileError, match=STATE_ARRAYS):
        load_state(tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("edit, match", [
    (lambda d: {**d, "surprise": 1}, "surprise"),
    (lambda d: {k: v for k, v in d.items() if k != "history"}, "history"),
    (lambda d: {**d, "format": "other"}, "format"),
    (lambda d: {**d, "version": 99}, "version 99"),
    (lambda d: {**d, "round": -1}, "round"),
    (lambda d: {**d, "history": {"a": 1}}, "history"),
    (lambda d: {**d, "pseudo": [{"idx": {"$array": "nope"}}]}, "nope"),
])
def test_unexpected_state_content_is_refused(tmp_path, edit, match):
    save_state(_state(), tmp_path)
    doc = json.loads((tmp_path / STATE_JSON).read_text())
    (tmp_path / STATE_JSON).write_text(json.dumps(edit(doc)))
    with pytest.raises(StateFileError, match=match) as err:
        load_state(tmp_path)
    assert STATE_JSON in str(err.value)


def test_state_json_that_does_not_parse_is_refused(tmp_path):
    save_state(_state(), tmp_path)
    (tmp_path / STATE_JSON).write_text("{not json")
    with pytest.raises(StateFileError, match="not a readable JSON file") as err:
        load_state(tmp_path)
    assert str(tmp_path / STATE_JSON) in str(err.value)


# ---- the generator's training state ----------------------------------------------------

TINY = {"resolution": 8, "steps": 3, "batch_size": 2,
        "training": {"steps": 4, "batch_size": 16, "block_channels": [8, 16],
                     "checkpoint_every": 2}}


def _ddpm_cfg(cache):
    from aspkd_ray.config import from_dict

    return from_dict({"seed": 1, "cache_dir": str(cache), "generator": TINY})


@pytest.mark.timeout(120)
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_ddpm_state_is_data_and_a_planted_pickle_is_refused(tmp_path):
    from aspkd_ray.generation import generator_dir, train_generator
    from aspkd_ray.generation.train_ddpm import TrainingStateError, load_training_state

    cfg = _ddpm_cfg(tmp_path / "cache")
    folder = train_generator(cfg, progress=False, max_steps=2)
    state_path = folder / "checkpoint" / "state.pt"
    # What the trainer writes loads as data only.
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    assert state["step"] == 2 and state["rng"].dtype == torch.uint8
    assert load_training_state(state_path)["key"] == state["key"]

    marker = tmp_path / "pwned"
    torch.save({"key": Payload(marker)}, state_path)  # a planted pickle, in torch's format
    with pytest.raises(TrainingStateError) as err:
        train_generator(cfg, progress=False, max_steps=1)
    assert not marker.exists()
    assert str(state_path) in str(err.value) and "delete" in str(err.value)
    assert "never unpickled" in str(err.value)

    _plant_pickle(state_path, marker)  # a bare pickle file
    with pytest.raises(TrainingStateError, match="delete"):
        train_generator(cfg, progress=False, max_steps=1)
    assert not marker.exists()

    # The old format (no format tag) is refused too, with the same way out.
    old = {k: v for k, v in state.items() if k != "format"}
    torch.save(old, state_path)
    with pytest.raises(TrainingStateError, match="older version"):
        train_generator(cfg, progress=False, max_steps=1)
    assert generator_dir(cfg) == folder
