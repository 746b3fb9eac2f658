"""The audit's results: the stealability curve per defence and attack, the calls needed to
reach each agreement level, each defence's utility cost, and PRADA's calls to detection, as
audit.json, audit.md and audit.png."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from aspkd_ray.config import Config
from aspkd_ray.quality.methods import get_method
from aspkd_ray.quality.scenario import Scenario
from aspkd_ray.quality.stats import mean_std

BENIGN_SEED = 0  # the benign stream's order


def summarise(cfg: Config, scn: Scenario, scenarios: dict, rows: list[dict], failed: list,
              wall_s: float) -> dict:
    """Everything the report shows, from the trials' rows (JSON-ready)."""
    from aspkd_ray.audit.runner import ZERO_CALLS, defence_label

    a, n_cls = cfg.audit, scn.num_classes
    curves, prada = [], []
    for name, entry in scenarios.items():
        label = defence_label(entry["spec"])
        served = _served_classes(entry["scenario"])
        for attack in a.attacks:
            points = []
            for cpc in a.calls_per_class:
                mine = [r for r in rows if r["scenario"] == name and r["method"] == attack
                        and r["calls_per_class"] == cpc and r["seed"] in a.seeds]
                if not mine:
                    continue
                m, s = mean_std([r["agreement"] for r in mine])
                points.append({"calls_per_class": cpc, "calls": cpc * n_cls,
                               "agreement": round(m, 2), "std": round(s, 2),
                               "seeds": len(mine)})
                for r in mine:
                    prada.append({"defence": label, "attack": attack, "calls_per_class": cpc,
                                  "seed": r["seed"], "calls": len(r["queries"]),
                                  **_prada(scn, r["queries"], served, a)})
            curves.append({"defence": label, "attack": attack, "points": points,
                           "calls_to": {str(lv): _calls_to(points, lv) for lv in a.levels}})
    zero = [r["agreement"] for r in rows if r["method"] == ZERO_CALLS and r["seed"] in a.seeds]
    zero_calls = None
    if zero:
        m, sd = mean_std(zero)
        zero_calls = {"agreement": round(m, 2), "std": round(sd, 2)}
    return {"config": cfg.dataset.name, "scenario": scn.describe(),
            "audit": dataclasses.asdict(a),
            "zero_calls": zero_calls,
            "num_classes": n_cls,
            "curves": curves, "utility": _utility(cfg, scn, scenarios),
            "prada": prada, "benign": _benign(scn, a), "failed": [c.key for c in failed],
            "wall_s": wall_s, "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}


def _served_classes(scn: Scenario) -> np.ndarray:
    """The class the teacher sold for each proxy image (PRADA's per-class sets)."""
    answers = (scn.served or scn.answers)
    if ("proxy", "soft") in answers:
        return np.asarray(answers["proxy", "soft"]).argmax(1)
    return np.asarray(answers["proxy", "hard"])


def _prada(scn: Scenario, queries: list[int], served: np.ndarray, a) -> dict:
    from aspkd_ray.audit.prada import prada_detect

    idx = np.asarray(queries, np.int64)
    x = scn.pools["proxy"].x[idx].numpy()
    res = prada_detect(x, served[idx], delta=a.prada_delta,
                       min_distances=a.prada_min_distances)
    return {"flagged": bool(res.flagged), "calls_to_detection": res.calls_to_detection}


def _benign(scn: Scenario, a) -> dict:
    """PRADA on the victim's real test images in a random order: what honest use looks like."""
    from aspkd_ray.audit.prada import prada_detect

    order = np.random.default_rng(BENIGN_SEED).permutation(len(scn.victim_test))
    res = prada_detect(scn.x_test[order].numpy(), scn.victim_test[order], delta=a.prada_delta,
                       min_distances=a.prada_min_distances)
    return {"calls": int(len(order)), "flagged": bool(res.flagged),
            "calls_to_detection": res.calls_to_detection}


def _utility(cfg: Config, scn: Scenario, scenarios: dict) -> list[dict]:
    """The victim's own test accuracy without and with each defence."""
    from aspkd_ray.audit.runner import defence_label
    from aspkd_ray.datasets import load_victim_data
    from aspkd_ray.evaluation.oracle import EvaluationOracle
    from aspkd_ray.teacher.defences import parse_defence, utility_cost

    base = scn.cell_config([])
    test = load_victim_data(base.dataset.name, "test", base.dataset.root,
                            base.dataset.download)
    if base.victim.output == "hard":  # only top1 applies to class ids, and changes nothing
        return [{"defence": defence_label(e["spec"]), "cost": 0.0} for e in scenarios.values()]
    probs = EvaluationOracle(base, scn.num_classes).predict_proba(test.images)
    out = []
    for entry in scenarios.values():
        spec = entry["spec"]
        if spec is None:
            acc = float((probs.argmax(1) == test.labels).mean())
            cost = {"accuracy": acc, "defended_accuracy": acc, "cost": 0.0}
        else:
            cost = utility_cost(parse_defence(spec), probs, test.labels)
        out.append({"defence": defence_label(spec),
                    **{k: round(v * 100, 2) for k, v in cost.items()}})
    return out


def _calls_to(points: list[dict], level: float) -> int | None:
    """The fewest calls on the ladder whose mean agreement reaches `level` (None: none)."""
    for p in points:
        if p["agreement"] >= level:
            return p["calls"]
    return None


def write_report(summary: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "audit.json", out / "audit.md"]
    tmp = out / "audit.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, paths[0])
    paths[1].write_text(markdown(summary))
    if any(c["points"] for c in summary["curves"]):
        paths.append(plot(summary, out / "audit.png"))
    return paths


def _attack_label(name: str) -> str:
    return {"default": "ASPKD", "vanilla": "random picks (Knockoff-style)"}.get(
        name, get_method(name).label or name)


def markdown(s: dict) -> str:
    a, info = s["audit"], s["scenario"]
    budgets = a["calls_per_class"]
    lines = [f"# How stealable is the {s['config']} victim", "",
             f"Command: `{s.get('command', 'aspkd audit')}` ({s['date']}, {s['machine']}; "
             f"{s['wall_s'] / 60:.1f} min for "
             f"{sum(len(c['points']) for c in s['curves']) * len(a['seeds'])} trials. "
             f"Victim test accuracy {info['victim_test_accuracy']:.1f}% on "
             f"{info['test_images']} test images; proxy pool {info['proxy_pool']} images).", "",
             f"Each trial is one attack by the product's round loop against the victim's "
             f"answers as the teacher service sells them (behind the defence), metered by the "
             f"service's budget rule. Students train {a['max_epochs'] or 'the config'} epochs "
             f"per fit (the audit's shorter schedule; a real attacker may train longer and do "
             f"better). Seeds: {a['seeds']}. Agreement: % of the victim's real test images "
             f"where the student and the undefended victim agree.", "",
             "## Stealability: agreement (%) against calls per class", "",
             *_zero_line(s),
             "| defence | attack | " + " | ".join(str(b) for b in budgets) + " |",
             "|---|---|" + "---:|" * len(budgets)]
    for c in s["curves"]:
        by = {p["calls_per_class"]: p for p in c["points"]}
        cells = [_point(by.get(b)) for b in budgets]
        lines.append(f"| {c['defence']} | {_attack_label(c['attack'])} | "
                     + " | ".join(cells) + " |")
    levels = [str(lv) for lv in a["levels"]]
    top = max(budgets) * s["num_classes"]
    lines += ["", "## Calls needed to reach an agreement level", "",
              "The fewest calls on the ladder at which the mean agreement reaches the level "
              f"(> {top}: not within the ladder).", "",
              "| defence | attack | " + " | ".join(f"{float(lv):g}%" for lv in levels) + " |",
              "|---|---|" + "---:|" * len(levels)]
    for c in s["curves"]:
        lines.append(f"| {c['defence']} | {_attack_label(c['attack'])} | " + " | ".join(
            str(c["calls_to"][lv]) if c["calls_to"][lv] is not None else f"> {top}"
            for lv in levels) + " |")
    lines += ["", "## What each defence costs honest users", "",
              "The victim's own test accuracy (%) without and with the defence.", "",
              "| defence | accuracy | with the defence | cost (points) |", "|---|---:|---:|---:|"]
    for u in s["utility"]:
        lines.append(f"| {u['defence']} | {u.get('accuracy', '–')} | "
                     f"{u.get('defended_accuracy', '–')} | {u['cost']:.2f} |")
    b = s["benign"]
    lines += ["", "## PRADA: after how many calls is the query stream flagged", "",
              f"Shapiro–Wilk on each new query's L2 distance to the client's earlier ones "
              f"(per answered class), flagged when W < δ = {a['prada_delta']}, tested from "
              f"{a['prada_min_distances']} distances. Benign reference: the victim's "
              f"{b['calls']} real test images in a random order: "
              + (f"**flagged after {b['calls_to_detection']} calls** (δ is too high for this "
                 f"victim; lower it)." if b["flagged"] else "not flagged.") + "", "",
              "| defence | attack | " + " | ".join(str(x) for x in budgets) + " |",
              "|---|---|" + "---:|" * len(budgets)]
    for c in s["curves"]:
        cells = []
        for cpc in budgets:
            hits = [p for p in s["prada"] if p["defence"] == c["defence"]
                    and p["attack"] == c["attack"] and p["calls_per_class"] == cpc]
            cells.append(_prada_cell(hits))
        lines.append(f"| {c['defence']} | {_attack_label(c['attack'])} | "
                     + " | ".join(cells) + " |")
    lines += ["", "Each cell: the call at which the stream was flagged (per seed), or "
              "\"not flagged in N\" for a stream of N calls.", ""]
    if s["failed"]:
        lines += [f"**{len(s['failed'])} trials failed**: {s['failed'][:5]}", ""]
    return "\n".join(lines)


def _zero_line(s: dict) -> list[str]:
    z = s.get("zero_calls")
    if not z:
        return []
    return [f"With no call at all, a student trained on the proxy set's prompt labels agrees "
            f"with the victim on **{z['agreement']:.1f}%** (± {z['std']:.1f}) of its test "
            f"images: what the generator alone gives away, whatever the defence.", ""]


def _point(p: dict | None) -> str:
    if p is None:
        return "–"
    return f"{p['agreement']:.1f}" + (f" ± {p['std']:.1f}" if p["seeds"] > 1 else "")


def _prada_cell(hits: list[dict]) -> str:
    if not hits:
        return "–"
    flagged = [str(h["calls_to_detection"]) for h in hits if h["flagged"]]
    if flagged:
        return ", ".join(flagged)
    return f"not flagged in {hits[0]['calls']}"


def plot(s: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    defences = list(dict.fromkeys(c["defence"] for c in s["curves"]))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    attacks = list(dict.fromkeys(c["attack"] for c in s["curves"]))
    for c in s["curves"]:
        if not c["points"]:
            continue
        x = [p["calls"] for p in c["points"]]
        y = np.array([p["agreement"] for p in c["points"]])
        sd = np.array([p["std"] for p in c["points"]])
        colour = colours[defences.index(c["defence"]) % len(colours)]
        if any(p["seeds"] > 1 for p in c["points"]):
            ax.fill_between(x, y - sd, y + sd, color=colour, alpha=0.08)
        ax.plot(x, y, marker="o", color=colour,
                linestyle=styles[attacks.index(c["attack"]) % len(styles)],
                label=f"{c['defence']}, {_attack_label(c['attack'])}")
    for lv in s["audit"]["levels"]:
        ax.axhline(lv, color="grey", linewidth=0.6, linestyle=":")
    if s.get("zero_calls"):
        ax.axhline(s["zero_calls"]["agreement"], color="black", linewidth=1.0,
                   linestyle="-.", label="no calls (prompt labels only)")
    ladder = [b * s["num_classes"] for b in s["audit"]["calls_per_class"]]
    ax.set_xscale("log", base=2)
    ax.set_xticks(ladder, [str(v) for v in ladder])
    ax.minorticks_off()
    ax.set_xlabel("calls to the victim (total)")
    ax.set_ylabel("agreement with the victim (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"How stealable is the {s['config']} victim, by defence")
    ax.legend(fontsize=7, loc="lower right")
    fig.text(0.01, 0.005, f"aspkd audit, {s['date']}, {s['machine']}; students "
             f"{s['audit']['max_epochs']} epochs per fit; seeds {s['audit']['seeds']}",
             fontsize=6, color="grey")
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
