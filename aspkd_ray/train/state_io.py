"""Round checkpoints on disk: data only, never code.

A round checkpoint folder holds

- `attack_state.json`: the round counter, history rows, pre-training result and per-round
  pseudo-label records, with every NumPy array replaced by a reference {"$array": name};
- `attack_state.npz`: those arrays (bought indices and labels, pseudo-label idx / classes),
  read with `allow_pickle=False`;
- `student.safetensors`: the student's weights.

A run folder may come from anywhere (copied, shared, restored from a bucket), so nothing in
it is unpickled: a file that does not parse as this format is refused with an error naming
it. An `attack_state.pkl` (the old pickle format) is never read.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aspkd_ray.aspkd.rounds import AttackState
from aspkd_ray.errors import UserError
from aspkd_ray.storage import atomic_file

STATE_JSON = "attack_state.json"
STATE_ARRAYS = "attack_state.npz"
STUDENT_FILE = "student.safetensors"
LEGACY_STATE = "attack_state.pkl"   # pickle: refused, never opened
FORMAT = "aspkd-attack-state"
VERSION = 1
_FIELDS = {"format", "version", "round", "history", "pseudo", "pretrain", "bought_labels"}
_OPTIONAL = {"bought_val", "torch_rng"}  # fields added since version 1 was first written
_ARRAY = "$array"


class StateFileError(UserError):
    """A round checkpoint file is missing, unreadable or not in the expected format."""


def _restart_hint(folder: Path) -> str:
    return (f"delete the attack's round checkpoints (the Ray Train folder holding "
            f"{folder.name}; <output_dir>/ray_train/attack for `aspkd steal`) to restart the "
            f"attack from round 1; labels already bought stay free, the ledger keeps them.")


# ---- AttackState <-> (JSON tree, arrays) --------------------------------------------------

def _encode(value: Any, arrays: dict[str, np.ndarray], where: str) -> Any:
    """A JSON-ready copy of `value`; arrays go to `arrays` under the name `where`."""
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise TypeError(f"attack state {where}: object arrays cannot be saved as data.")
        arrays[where] = value
        return {_ARRAY: where}
    if isinstance(value, np.generic):  # numpy scalars: plain JSON numbers / bools
        return value.item()
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str) or k == _ARRAY:
                raise TypeError(f"attack state {where}: key {k!r} cannot be saved (string keys "
                                f"other than {_ARRAY!r} only).")
            out[k] = _encode(v, arrays, f"{where}.{k}")
        return out
    if isinstance(value, list):
        return [_encode(v, arrays, f"{where}.{i}") for i, v in enumerate(value)]
    raise TypeError(f"attack state {where}: a {type(value).__name__} cannot be saved; use "
                    f"numbers, strings, lists, dicts or NumPy arrays.")


def _decode(value: Any, arrays: dict[str, np.ndarray], used: set[str], where: str) -> Any:
    if isinstance(value, dict):
        if _ARRAY in value:
            name = value[_ARRAY]
            if len(value) != 1 or not isinstance(name, str) or name not in arrays:
                raise ValueError(f"{where}: bad array reference {value!r}")
            used.add(name)
            return arrays[name]
        return {k: _decode(v, arrays, used, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, arrays, used, f"{where}.{i}") for i, v in enumerate(value)]
    return value


def save_state(state: AttackState, folder: str | Path) -> None:
    """Write `state` as attack_state.json + attack_state.npz in `folder`."""
    folder = Path(folder)
    arrays: dict[str, np.ndarray] = {"bought_idx": np.asarray(state.bought_idx)}
    doc = {
        "format": FORMAT, "version": VERSION, "round": int(state.round),
        "history": _encode(state.history, arrays, "history"),
        "pseudo": _encode(state.pseudo, arrays, "pseudo"),
        "pretrain": _encode(state.pretrain, arrays, "pretrain"),
        "bought_labels": (None if state.bought_labels is None else
                          _encode(np.asarray(state.bought_labels), arrays, "bought_labels")),
        "bought_val": _encode(state.bought_val, arrays, "bought_val"),
        "torch_rng": _encode(state.torch_rng, arrays, "torch_rng"),
    }
    # The arrays first, then the JSON that refers to them: a state whose JSON is there is
    # whole.
    with atomic_file(folder / STATE_ARRAYS) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    with atomic_file(folder / STATE_JSON) as tmp:
        Path(tmp).write_text(json.dumps(doc, indent=1))


def load_state(folder: str | Path) -> AttackState:
    """The AttackState saved by `save_state` in `folder`; StateFileError if anything is off."""
    folder = Path(folder)
    json_path, npz_path = folder / STATE_JSON, folder / STATE_ARRAYS
    if not json_path.is_file():
        if (folder / LEGACY_STATE).exists():
            raise StateFileError(
                f"{folder / LEGACY_STATE} is a round checkpoint in the old pickle format, which "
                f"is never loaded (unpickling a file can run any code in it); "
                f"{_restart_hint(folder)}")
        raise StateFileError(f"round checkpoint {folder} has no {STATE_JSON}; "
                             f"{_restart_hint(folder)}")
    try:
        doc = json.loads(json_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise StateFileError(f"{json_path} is not a readable JSON file ({exc}); "
                             f"{_restart_hint(folder)}") from exc
    if not isinstance(doc, dict) or not _FIELDS <= set(doc) <= _FIELDS | _OPTIONAL \
            or doc.get("format") != FORMAT:
        got = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
        raise StateFileError(f"{json_path} is not an aspkd attack state (expected the fields "
                             f"{sorted(_FIELDS)} with format {FORMAT!r}, got {got}); "
                             f"{_restart_hint(folder)}")
    if doc["version"] != VERSION:
        raise StateFileError(f"{json_path} has format version {doc['version']!r}; this aspkd "
                             f"reads version {VERSION}. {_restart_hint(folder)}")
    try:
        with np.load(npz_path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise StateFileError(f"{npz_path} is not a readable NumPy .npz file without objects "
                             f"({exc}); {_restart_hint(folder)}") from exc
    try:
        state = _state_from(doc, arrays)
    except (TypeError, ValueError, KeyError) as exc:
        raise StateFileError(f"{json_path} / {npz_path.name}: unexpected content ({exc}); "
                             f"{_restart_hint(folder)}") from exc
    return state


def _state_from(doc: dict, arrays: dict[str, np.ndarray]) -> AttackState:
    used = {"bought_idx"}
    rnd = doc["round"]
    if not isinstance(rnd, int) or isinstance(rnd, bool) or rnd < 0:
        raise ValueError(f"round must be a non-negative integer, got {rnd!r}")
    history = _decode(doc["history"], arrays, used, "history")
    pseudo = _decode(doc["pseudo"], arrays, used, "pseudo")
    pretrain = _decode(doc["pretrain"], arrays, used, "pretrain")
    for name, rows in (("history", history), ("pseudo", pseudo)):
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ValueError(f"{name} must be a list of objects")
    if pretrain is not None and not isinstance(pretrain, dict):
        raise ValueError("pretrain must be an object or null")
    idx = arrays["bought_idx"]
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"bought_idx must be a 1-D integer array, got {idx.dtype} "
                         f"{idx.shape}")
    labels = _decode(doc["bought_labels"], arrays, used, "bought_labels")
    if labels is not None and (not isinstance(labels, np.ndarray)
                               or labels.ndim not in (1, 2) or len(labels) != len(idx)):
        raise ValueError(f"bought_labels must be an array with one row per bought index "
                         f"({len(idx)})")
    bought_val = _decode(doc.get("bought_val"), arrays, used, "bought_val")
    if bought_val is not None and (
            not isinstance(bought_val, dict) or set(bought_val) != {"idx", "labels"}
            or not all(isinstance(v, np.ndarray) and v.ndim == 1 for v in bought_val.values())
            or len(bought_val["idx"]) != len(bought_val["labels"])):
        raise ValueError("bought_val must be null or {idx, labels}: two 1-D arrays of one "
                         "length")
    torch_rng = _decode(doc.get("torch_rng"), arrays, used, "torch_rng")
    if torch_rng is not None and (not isinstance(torch_rng, np.ndarray)
                                  or torch_rng.dtype != np.uint8 or torch_rng.ndim != 1):
        raise ValueError("torch_rng must be null or a 1-D uint8 array")
    extra = set(arrays) - used
    if extra:
        raise ValueError(f"unreferenced arrays {sorted(extra)}")
    return AttackState(round=rnd, bought_idx=idx, bought_labels=labels, history=history,
                       pseudo=pseudo, pretrain=pretrain, bought_val=bought_val,
                       torch_rng=torch_rng)


# ---- student weights ---------------------------------------------------------------------

def save_weights(student: torch.nn.Module, folder: str | Path) -> None:
    """The student's state dict as safetensors (DDP wrapper removed)."""
    from safetensors.torch import save_file

    net = getattr(student, "module", student)
    # clone: safetensors refuses tensors that share storage
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in net.state_dict().items()}
    save_file(tensors, str(Path(folder) / STUDENT_FILE))


def load_weights_file(folder: str | Path) -> dict[str, torch.Tensor]:
    """The student's state dict saved by `save_weights`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    path = folder / STUDENT_FILE
    if not path.is_file():
        raise StateFileError(f"round checkpoint {folder} has no {STUDENT_FILE}; "
                             f"{_restart_hint(folder)}")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise StateFileError(f"{path} is not a readable safetensors file ({exc}); "
                             f"{_restart_hint(folder)}") from exc

