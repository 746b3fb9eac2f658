"""Output defences: what the teacher service does to the victim's answer before selling it.

`victim.defence` names one registered defence and its parameters, e.g.
`{name: rounding, decimals: 2}`; null (the default) sells the victim's answer as it is.

A defence takes the victim's N x C probabilities (float) and returns the defended answer:
probabilities again, or class ids for a defence that is `hard` (top1), in which case the
service sells hard labels whatever victim.output says (`served_output`). It is applied in the
teacher service only (`defend`, wrapping the victim the service calls), never in
`victims.make_victim`: the evaluation oracle loads the victim through make_victim and must
keep measuring the undefended model.

The budget never depends on a defence: the service charges a sample when it reserves it,
before the victim is called, and records the defended answer as the one answer of that
sample (a restarted service rebuilds from the recorded answers, never by asking again).
Randomised defences are deterministic per input (gaussian_noise seeds each row from a hash of
its input and the defence's seed, not from the sample id), so a retry of an unanswered sample,
after a failure or a restart, gets the same noise the first call would have; only the
victim's own forward pass may differ in the last float bit with the batch's layout, as it
does undefended.

Defences from the Adversarial Robustness Toolbox (art.defences.postprocessor) where its
postprocessor does the job: rounding (Rounded), reverse_sigmoid (ReverseSigmoid). Written
here: top1 (ART's ClassLabels is wrong for batches, see Top1), topk (no ART counterpart;
HighConfidence is a cutoff) and gaussian_noise (not deterministic in ART, see GaussianNoise).
A new defence is a `Defence` subclass registered with `@register_defence("name")`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from aspkd_ray.config import Config, ConfigError
from aspkd_ray.registry import Registry

KEY = "victim.defence"


@dataclass(frozen=True)
class Param:
    """One parameter of a defence: its default and the accepted range (scikit-learn style
    messages name the key and what is accepted)."""

    default: Any
    kind: type          # int or float
    min: float | None = None  # inclusive
    gt: float | None = None   # strict lower bound

    def check(self, key: str, value: Any) -> Any:
        if self.kind is int and isinstance(value, float) and value.is_integer():
            value = int(value)  # as the config loader reads 2.0 for an integer key
        if self.kind is float and isinstance(value, str):
            try:  # PyYAML reads 1e-3 (no dot) as a string; the loader accepts it too
                value = float(value)
            except ValueError:
                pass
        ok_type = (isinstance(value, int) if self.kind is int
                   else isinstance(value, (int, float))) and not isinstance(value, bool)
        if ok_type and self.kind is float and not np.isfinite(value):
            ok_type = False
        if not ok_type or (self.min is not None and value < self.min) or \
                (self.gt is not None and value <= self.gt):
            raise ConfigError(f"{key}: got {value!r}; expected {self.accepted()}.")
        return self.kind(value)

    def accepted(self) -> str:
        what = "an integer" if self.kind is int else "a number"
        if self.min is not None:
            return f"{what} >= {self.min:g}"
        if self.gt is not None:
            return f"{what} > {self.gt:g}"
        return what


class Defence:
    """A registered output defence. `params`: name -> Param. `hard`: answers class ids."""

    params: dict[str, Param] = {}
    hard = False

    def apply(self, probs: np.ndarray, keys: np.ndarray, **params: Any) -> np.ndarray:
        """The defended answer for float64 N x C probabilities. `keys`: one uint64 per row,
        fixed by the row's input, for defences that draw random numbers."""
        raise NotImplementedError


DEFENCES: Registry[Defence] = Registry(KEY, instantiate=True)
register_defence = DEFENCES.register   # @register_defence("name") on a Defence class


def list_defences() -> list[str]:
    return DEFENCES.names()


@dataclass(frozen=True)
class BoundDefence:
    """A defence with its parameters (defaults filled in), as victim.defence configures it."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> Defence:
        return DEFENCES.get(self.name)

    @property
    def hard(self) -> bool:
        return self.kind.hard

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **self.params}

    def __call__(self, probs: np.ndarray, keys: np.ndarray | None = None) -> np.ndarray:
        """Defend N x C probabilities; `keys` default to a hash of each probability row."""
        p = np.asarray(probs, np.float64)
        if p.ndim != 2:
            raise ValueError(f"a defence takes N x C probabilities, got shape {p.shape}.")
        keys = row_keys(p) if keys is None else np.asarray(keys, np.uint64)
        if keys.shape != (len(p),):
            raise ValueError(f"one key per row: got {keys.shape} keys for {len(p)} rows.")
        out = self.kind.apply(p, keys, **self.params)
        return out.astype(np.int64) if self.hard else out


def parse_defence(spec: Mapping[str, Any] | None, key: str = KEY) -> BoundDefence | None:
    """victim.defence as a BoundDefence (None when undefended); ConfigError naming the key,
    the value and what is accepted."""
    if spec is None:
        return None
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{key}: got {spec!r}; expected a mapping such as "
                          f"{{name: rounding, decimals: 2}}, or null (undefended).")
    names = list_defences()
    name = spec.get("name")
    if name not in names:
        raise ConfigError(f"{key}.name: got {name!r}; expected one of: {', '.join(names)}.")
    kind = DEFENCES.get(name)
    unknown = sorted(set(spec) - {"name"} - set(kind.params))
    if unknown:
        accepted = ", ".join(sorted(kind.params)) or "none"
        raise ConfigError(f"unknown key {key}.{unknown[0]} for defence {name}; accepted "
                          f"parameters: {accepted}.")
    params = {p: kind.params[p].check(f"{key}.{p}", spec.get(p, kind.params[p].default))
              for p in kind.params}
    return BoundDefence(name, params)


def configured_defence(cfg: Config) -> BoundDefence | None:
    """cfg's victim.defence, checked against victim.output too."""
    bound = parse_defence(cfg.victim.defence)
    if bound is not None and not bound.hard and cfg.victim.output == "hard":
        raise ConfigError(f"{KEY}: got {bound.describe()!r} with victim.output=hard; "
                          f"{bound.name} works on probabilities, and a hard-label victim "
                          f"answers class ids only. Set victim.output=soft, or use "
                          f"{{name: top1}}.")
    return bound


def served_output(cfg: Config) -> str:
    """What the teacher service sells (its ledger's output mode): 'hard' under a hard
    defence (top1), else victim.output."""
    bound = parse_defence(cfg.victim.defence)
    return "hard" if bound is not None and bound.hard else cfg.victim.output


def describe_defence(cfg: Config) -> dict[str, Any] | None:
    """victim.defence with its defaults filled in (None when undefended), for describe()."""
    bound = parse_defence(cfg.victim.defence)
    return None if bound is None else bound.describe()


def row_keys(rows: Any) -> np.ndarray:
    """One uint64 per row (of an array or a torch tensor) from its bytes (SHA-256): the same
    input always gets the same key, in any batch, any process, after any restart (Python's
    hash() is salted per process)."""
    arr = rows.detach().cpu().numpy() if hasattr(rows, "detach") else np.asarray(rows)
    flat = np.ascontiguousarray(arr).reshape(len(arr), -1)
    return np.asarray([int.from_bytes(hashlib.sha256(r.tobytes()).digest()[:8], "little")
                       for r in flat], np.uint64)


class DefendedVictim:
    """A victim whose answers pass through a defence (the teacher service's view of it).

    Same interface as the victims of victims.py; other attributes (device, name, secrets)
    are the wrapped victim's. Its output is 'hard' under top1.
    """

    def __init__(self, victim: Any, defence: BoundDefence) -> None:
        self.victim, self.defence = victim, defence
        self.output = "hard" if defence.hard else victim.output
        self.num_classes = victim.num_classes
        self.remote = getattr(victim, "remote", True)

    def __getattr__(self, name: str) -> Any:
        if name == "victim":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.victim, name)

    def predict(self, x: Any) -> np.ndarray:
        from aspkd_ray.teacher.checks import check_answer

        raw = self.victim.predict(x)
        if self.victim.output == "hard":  # top1 only (configured_defence): ids stay ids
            return np.asarray(raw)
        # The defence gets checked probabilities; a malformed answer fails here as it would
        # in the service (InvalidAnswer), its samples then reserved but unanswered.
        probs = check_answer(raw, len(x), self.num_classes, "soft")
        return self.defence(probs, row_keys(x))


def defend(victim: Any, cfg: Config) -> Any:
    """The victim behind victim.defence (itself when undefended)."""
    bound = configured_defence(cfg)
    return victim if bound is None else DefendedVictim(victim, bound)


def utility_cost(defence: BoundDefence | Mapping[str, Any], probs: np.ndarray,
                 labels: np.ndarray) -> dict[str, float]:
    """The victim's own test accuracy without and with the defence, from its probabilities
    on the test set (N x C) and the true labels: what the defence costs honest users."""
    bound = defence if isinstance(defence, BoundDefence) else parse_defence(defence)
    p = np.asarray(probs, np.float64)
    y = np.asarray(labels)
    defended = bound(p)
    pred = defended if bound.hard else defended.argmax(1)
    before = float((p.argmax(1) == y).mean()) if len(y) else float("nan")
    after = float((pred == y).mean()) if len(y) else float("nan")
    return {"accuracy": before, "defended_accuracy": after, "cost": before - after}


def _renormalise(p: np.ndarray) -> np.ndarray:
    """Rows scaled to sum to 1; a row with nothing left becomes one-hot at its largest
    value (it must still be a probability vector the service accepts)."""
    sums = p.sum(1, keepdims=True)
    empty = sums[:, 0] <= 0
    if empty.any():
        p = p.copy()
        hot = np.zeros((int(empty.sum()), p.shape[1]))
        hot[np.arange(len(hot)), p[empty].argmax(1)] = 1.0
        p[empty], sums[empty] = hot, 1.0
    return p / sums


# ---- the shipped defences ----------------------------------------------------------------

@register_defence("top1")
class Top1(Defence):
    """The class id only: the service sells hard labels."""

    hard = True

    def apply(self, probs: np.ndarray, keys: np.ndarray, **params: Any) -> np.ndarray:
        # Not ART's ClassLabels: in 1.20.1 it marks every row's argmax column in every row
        # (class_labels[:, index_labels] = 1), so a batch of more than one is wrong.
        return probs.argmax(1)


@register_defence("topk")
class TopK(Defence):
    """The k largest probabilities, the rest zeroed, renormalised (ties: lower class id)."""

    params = {"k": Param(3, int, min=1)}

    def apply(self, probs: np.ndarray, keys: np.ndarray, k: int = 3) -> np.ndarray:
        keep = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        out = np.zeros_like(probs)
        np.put_along_axis(out, keep, np.take_along_axis(probs, keep, 1), 1)
        return _renormalise(out)


@register_defence("rounding")
class Rounding(Defence):
    """Probabilities on a grid of `decimals` decimals, still summing to 1."""

    params = {"decimals": Param(2, int, min=1)}

    def apply(self, probs: np.ndarray, keys: np.ndarray, decimals: int = 2) -> np.ndarray:
        from art.defences.postprocessor import Rounded

        # ART rounds each value; C rounded values can miss a sum of 1 by up to C/2 grid
        # steps, which the service rejects as not a probability vector (checks.py). The
        # missing (or extra) steps go to the values rounding moved most (largest remainder):
        # every value stays on the grid, within one step of the victim's.
        unit = 10.0 ** decimals
        steps = np.rint(Rounded(decimals=decimals)(probs) * unit)
        residue = probs * unit - steps
        short = (unit - steps.sum(1)).astype(np.int64)
        order = np.argsort(-residue, axis=1, kind="stable")  # most rounded down first
        for i in np.flatnonzero(short):
            if short[i] > 0:
                steps[i, order[i, :short[i]]] += 1
            else:
                up = [j for j in order[i, ::-1] if steps[i, j] > 0][:-short[i]]
                steps[i, up] -= 1
        return steps / unit


@register_defence("gaussian_noise")
class GaussianNoise(Defence):
    """N(0, scale^2) noise on every probability, clipped at 0, renormalised; the argmax may
    change. Written here rather than ART's GaussianNoise: that one draws from numpy's global
    RNG for the whole batch, so a row's noise would depend on its batch neighbours and on any
    other use of that RNG in the process (the service runs threads), and a retry could not
    return the answer the first call would have. Here each row's noise comes from its own
    generator, seeded by (seed, hash of the row's input): the same input always gets the
    same answer, and sending an image again, under any id, cannot average the noise away."""

    params = {"scale": Param(0.1, float, gt=0.0), "seed": Param(0, int, min=0)}

    def apply(self, probs: np.ndarray, keys: np.ndarray, scale: float = 0.1,
              seed: int = 0) -> np.ndarray:
        noise = np.stack([np.random.default_rng([seed, int(k)]).normal(0.0, scale,
                                                                        probs.shape[1])
                          for k in keys]) if len(keys) else np.zeros_like(probs)
        return _renormalise(np.clip(probs + noise, 0.0, None))


@register_defence("reverse_sigmoid")
class ReverseSigmoid(Defence):
    """Lee et al. 2019, "Defending against NN model stealing attacks using deceptive
    perturbations" (ART's ReverseSigmoid): each probability is pushed away from what a
    sigmoid-inverting attacker would read, then renormalised; beta is the magnitude, gamma
    the convergence parameter."""

    params = {"beta": Param(1.0, float, gt=0.0), "gamma": Param(0.1, float, gt=0.0)}

    def apply(self, probs: np.ndarray, keys: np.ndarray, beta: float = 1.0,
              gamma: float = 0.1) -> np.ndarray:
        from art.defences.postprocessor import ReverseSigmoid as ArtReverseSigmoid

        out = ArtReverseSigmoid(beta=beta, gamma=gamma)(probs)
        return _renormalise(np.clip(np.nan_to_num(out, nan=0.0), 0.0, None))
