"""What the quality benchmark compares: each method is a set of config switches over the
same round loop (`aspkd.rounds.run_rounds`), registered by name like every other extension
point. The scenario's own config is the "same start" (the init step on generation classes
and the prior correction, as the embedded configs ship)."""

from __future__ import annotations

from dataclasses import dataclass

from aspkd_ray.registry import Registry


@dataclass(frozen=True)
class Method:
    overrides: tuple[str, ...] = ()  # --set switches over the scenario's config
    pool: str = "proxy"              # proxy: the generated proxy set; natural: a natural pool
    budgeted: bool = True            # False: one row per seed, not per calls_per_class
    in_grid: bool = True             # False: run only when named (--methods)
    label: str = ""                  # how tables and plots name it


METHODS: Registry[Method] = Registry("method")
register_method = METHODS.register

_PLAIN = ("student.pretrain=none", "aspkd.prior_correction=false")


def _add(name: str, method: Method) -> None:
    register_method(name)(method)


# The paper's Table 3 over the same start: vanilla, +active, +self-paced, both (ASPKD).
_add("vanilla", Method(("aspkd.selection=random", "aspkd.self_paced=false"),
                       label="vanilla"))
_add("active", Method(("aspkd.selection=paper", "aspkd.self_paced=false"),
                      label="+active"))
_add("self_paced", Method(("aspkd.selection=random", "aspkd.self_paced=true",
                           "aspkd.pseudo_labels=paper"),
                          label="+self-paced"))
_add("aspkd", Method(("aspkd.selection=paper", "aspkd.self_paced=true",
                      "aspkd.pseudo_labels=paper"),
                     label="ASPKD (both)"))
# Algorithm 1 alone: default init, raw teacher answers.
_add("aspkd_plain", Method(("aspkd.variant=paper",), label="Algorithm 1 alone"))
# Knockoff Nets: random picks from a natural pool that is not the victim's data, bought
# labels only, the same student from its default init.
_add("knockoff", Method(("aspkd.selection=random", "aspkd.self_paced=false", *_PLAIN),
                        pool="natural", label="Knockoff (natural pool)"))
# Hard-label victims: class ids only.
_add("vanilla_hard", Method(("aspkd.selection=random", "aspkd.self_paced=false",
                             "victim.output=hard"), label="vanilla, hard labels"))
_add("aspkd_hard", Method(("aspkd.selection=paper", "aspkd.self_paced=true",
                           "aspkd.pseudo_labels=paper", "victim.output=hard"),
                          label="ASPKD, hard labels"))
# The scenario's config as it is: this product's method where the config is the shipped
# one (the audit's ASPKD attack).
_add("default", Method((), in_grid=False, label="ASPKD as configured"))
# References that do not depend on the budget.
_add("prompt_only", Method(("aspkd.baseline=prompt_only",), budgeted=False, label="prompt labels only (no calls)"))
# The teacher's labels on the whole proxy pool: one round over the same start.
_add("teacher_all", Method(("aspkd.selection=random", "aspkd.self_paced=false",
                            "aspkd.rounds=1"), budgeted=False,
                           label="teacher labels on the whole pool"))

# Beyond the paper (aspkd/variants.py): named with --methods, compared with aspkd.
_add("aspkd_confident", Method(("aspkd.selection=paper", "aspkd.self_paced=true",
                                "aspkd.pseudo_labels=confident"), in_grid=False,
                               label="ASPKD, confident pseudo-labels"))
_add("aspkd_confident_student", Method(
    ("aspkd.selection=paper", "aspkd.self_paced=true", "aspkd.pseudo_labels=confident",
     "aspkd.pl_student_agreement=true", "aspkd.generation_class_filter=false"), in_grid=False,
    label="ASPKD, confident, student filter"))
# the confident rule with only its k bound (no sharpening, threshold or caps)
_add("aspkd_kbound", Method(("aspkd.selection=paper", "aspkd.self_paced=true",
                             "aspkd.pseudo_labels=confident", "aspkd.pl_temperature=1",
                             "aspkd.pl_min_confidence=0", "aspkd.pl_class_cap=null"),
                            in_grid=False, label="ASPKD, k bounded per class"))
_add("aspkd_adaptive", Method(("aspkd.selection=paper", "aspkd.self_paced=true",
                               "aspkd.pseudo_labels=adaptive"), in_grid=False,
                              label="ASPKD, adaptive pseudo-labels"))
_add("aspkd_adaptive_prior", Method(("aspkd.selection=paper", "aspkd.self_paced=true",
                                     "aspkd.pseudo_labels=adaptive",
                                     "aspkd.quotas=teacher_prior"), in_grid=False,
                                    label="ASPKD, adaptive, teacher-prior quotas"))
_add("aspkd_kcenter", Method(("aspkd.selection=kcenter", "aspkd.self_paced=true"),
                             in_grid=False, label="ASPKD, k-center picks"))
_add("aspkd_ema", Method(("aspkd.selection=paper", "aspkd.self_paced=true",
                          "training.ema=0.99"), in_grid=False,
                         label="ASPKD, weight average"))
_add("prompt_only_ema", Method(("aspkd.baseline=prompt_only", "training.ema=0.99"),
                               budgeted=False, in_grid=False,
                               label="prompt labels only, weight average"))

# The paper's ablation, in Table 3's order; the differences the report pairs.
ABLATION = ("vanilla", "active", "self_paced", "aspkd")
COMPARISONS = (("aspkd", "vanilla"), ("active", "vanilla"), ("self_paced", "vanilla"),
               ("aspkd", "active"), ("aspkd", "self_paced"), ("aspkd", "aspkd_plain"),
               ("aspkd", "prompt_only"), ("aspkd", "knockoff"),
               ("aspkd_hard", "vanilla_hard"), ("aspkd_confident", "aspkd"),
               ("aspkd_confident_student", "aspkd"), ("aspkd_kcenter", "aspkd"),
               ("aspkd_confident", "vanilla"), ("aspkd_confident_student", "vanilla"),
               ("aspkd_kcenter", "vanilla"), ("aspkd_kbound", "aspkd"),
               ("aspkd_kbound", "vanilla"), ("aspkd_ema", "aspkd"),
               ("aspkd_adaptive", "aspkd"), ("aspkd_adaptive", "vanilla"),
               ("aspkd_adaptive", "prompt_only"), ("aspkd_adaptive", "aspkd_plain"),
               ("aspkd_adaptive_prior", "aspkd_adaptive"),
               ("prompt_only_ema", "prompt_only"))


def get_method(name: str) -> Method:
    return METHODS.get(name)


def method_names(grid_only: bool = False) -> list[str]:
    """Registered methods (with grid_only, those of the default grid), the paper's ablation
    first."""
    rest = [m for m in METHODS.names() if m not in ABLATION]
    return [m for m in (*ABLATION, *rest) if not grid_only or get_method(m).in_grid]
