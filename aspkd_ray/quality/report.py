"""quality.md (a Table-3-style table per scenario, paired differences with bootstrap CIs,
the targets), quality.png (agreement against calls per class) and quality_pseudo.png (the
pseudo-labels against the victim, like the paper's Figure 9), from quality.json's rows."""

from __future__ import annotations

from pathlib import Path

from aspkd_ray.quality.methods import COMPARISONS, get_method, method_names
from aspkd_ray.quality.stats import mean_std, paired_diff

TARGET_MAX_BUDGET = 16  # ASPKD ≥ vanilla is claimed up to here


def _self_paced(m: str) -> bool:
    return "aspkd.self_paced=true" in get_method(m).overrides


def _label(m: str) -> str:
    return get_method(m).label or m


NATURAL_NOTE = ("natural pool: scikit-learn's 8×8 digits, upscaled into the 20×20 box "
                "of MNIST's 28×28 frame")


def _what(m: str) -> str:
    method = get_method(m)
    text = f"`{' '.join(method.overrides) or 'the config'}`"
    return f"{text}, {NATURAL_NOTE}" if method.pool == "natural" else text


def _by(rows: list[dict], scenario: str, key: str = "agreement") -> dict:
    """(method, calls_per_class) → {seed: value}; budget-free methods under None."""
    out: dict = {}
    for r in rows:
        if r["scenario"] == scenario and r.get(key) is not None:
            out.setdefault((r["method"], r["calls_per_class"]), {})[r["seed"]] = r[key]
    return out


def _value(table: dict, method: str, budget: int) -> dict:
    """A method's values at a budget; budget-free methods have one value for all."""
    return table.get((method, budget)) or table.get((method, None)) or {}


def _cell(values: dict) -> str:
    if not values:
        return "–"
    m, s = mean_std(list(values.values()))
    return f"{m:.1f} ± {s:.1f} ({len(values)})"


def _diff(a: dict, b: dict) -> str:
    d = paired_diff(a, b)
    if d is None:
        return "–"
    text = f"{d.mean:+.1f} [{d.low:+.1f}, {d.high:+.1f}]"
    return f"**{text}**" if d.distinguishable else text


def _present(rows: list[dict]) -> tuple[list[str], list[str], list[int]]:
    scenarios = list(dict.fromkeys(r["scenario"] for r in rows))
    methods = [m for m in method_names() if any(r["method"] == m for r in rows)]
    budgets = sorted({r["calls_per_class"] for r in rows if r["calls_per_class"] is not None})
    return scenarios, methods, budgets


def write_report(results, out: Path) -> list[Path]:
    rows = results.rows
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "quality.md"]
    paths[0].write_text(markdown(results))
    if rows:
        paths += [plot_curve(results, out / "quality.png"),
                  plot_pseudo(results, out / "quality_pseudo.png")]
    return paths


def markdown(results) -> str:
    rows, st = results.rows, results.settings
    scenarios, methods, budgets = _present(rows)
    lines = ["# Quality: the paper's Table 3 and the budget curve", "",
             f"Command: `{st['command']}` ({st.get('date', '?')}; machine: "
             f"{st['machine']}, no GPU). Benchmark settings over the scenarios' configs: "
             f"`{' '.join(st['overrides']) or 'none'}`. Each cell is one attack by the "
             "product's round loop, in process (a Ray task per cell), its teacher metered by "
             "the teacher service's budget rule. Seed i of every method uses the same proxy "
             "set, student init and init step.", "",
             "Agreement (%) with the victim on its real test set: mean ± std (seeds). "
             "Differences are paired by seed: mean [95% percentile-bootstrap interval over "
             "seeds]; **bold** intervals exclude 0. With 3–5 seeds these intervals are "
             "narrower than t intervals would be; read them as a screen, not a proof.", "",
             "| method | what it is |", "|---|---|"]
    lines += [f"| {_label(m)} | {_what(m)} |" for m in methods]
    for s in scenarios:
        lines += _scenario_section(results, s, methods, budgets)
    lines += _targets(rows, scenarios, budgets)
    return "\n".join(lines) + "\n"


def _scenario_section(results, s: str, methods: list[str], budgets: list[int]) -> list[str]:
    rows = results.rows
    table = _by(rows, s)
    info = results.scenarios.get(s, {})
    share = info.get("victim_majority_class_share", {})
    budgeted = [m for m in methods if get_method(m).budgeted]
    free = [m for m in methods if not get_method(m).budgeted]
    lines = ["", f"## {s}", "",
             f"Victim test accuracy {info.get('victim_test_accuracy', float('nan')):.1f}% on "
             f"{info.get('test_images', '?')} test images. Proxy pool "
             f"{info.get('proxy_pool', '?')} images, natural pool "
             f"{info.get('natural_pool', '?')}; the victim gives its most common class to "
             f"{share.get('proxy', '?')}% of the proxy pool and {share.get('natural', '?')}% "
             "of the natural pool.", "",
             "| calls/class | " + " | ".join(_label(m) for m in budgeted) + " |",
             "|---:|" + "---|" * len(budgeted)]
    for b in budgets:
        lines.append(f"| {b} | " + " | ".join(_cell(table.get((m, b), {})) for m in budgeted)
                     + " |")
    lines += [""] + [f"- {_label(m)}: {_cell(table.get((m, None), {}))}" for m in free]
    pairs = [(a, b) for a, b in COMPARISONS if a in methods and b in methods]
    lines += ["", "Paired differences (points):", "",
              "| calls/class | " + " | ".join(f"{_label(a)} − {_label(b)}" for a, b in pairs)
              + " |", "|---:|" + "---|" * len(pairs)]
    for b in budgets:
        lines.append(f"| {b} | " + " | ".join(
            _diff(_value(table, x, b), _value(table, y, b)) for x, y in pairs) + " |")
    pl, fr = _by(rows, s, "pseudo_label_agreement"), _by(rows, s, "filter_rate")
    sp = [m for m in methods if _self_paced(m)]
    lines += ["", "Pseudo-labels of the last round: % the victim shares / % filtered out "
              "(means over seeds):", "",
              "| calls/class | " + " | ".join(_label(m) for m in sp) + " |",
              "|---:|" + "---|" * len(sp)]
    for b in budgets:
        cells = []
        for m in sp:
            a, f = pl.get((m, b), {}), fr.get((m, b), {})
            cells.append(f"{mean_std(list(a.values()))[0]:.0f} / "
                         f"{mean_std(list(f.values()))[0] * 100:.0f}" if a and f else "–")
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    return lines


def _targets(rows: list[dict], scenarios: list[str], budgets: list[int]) -> list[str]:
    lines = ["", "## Targets", ""]
    for s in scenarios:
        table = _by(rows, s)
        for other, top in (("vanilla", TARGET_MAX_BUDGET), ("prompt_only", None),
                           ("knockoff", None)):
            checked = [b for b in budgets if top is None or b <= top]
            verdicts = []
            for b in checked:
                d = paired_diff(_value(table, "aspkd", b), _value(table, other, b))
                if d is not None:
                    verdicts.append((b, d))
            if not verdicts:
                continue
            missed = [f"{b} ({d.mean:+.1f})" for b, d in verdicts if d.mean < 0]
            sure = sum(d.low > 0 for _, d in verdicts)
            scope = f"every budget ≤ {top}" if top else "every budget"
            lines.append(f"- {s}: ASPKD ≥ {_label(other)} at {scope}: "
                         + (f"**met** at all {len(verdicts)}" if not missed else
                            f"**missed** at {', '.join(missed)} calls per class")
                         + f"; the interval lies above 0 at {sure} of {len(verdicts)}.")
    over = [r for r in rows if r["calls_used"] > r["budget"]]
    lines.append(f"- calls used ≤ budget: {len(rows) - len(over)} of {len(rows)} cells.")
    return lines


def _band(ax, table: dict, method: str, budgets: list[int], **style) -> None:
    """The method's mean over seeds at each budget, with a ± 1 std band."""
    xs = [b for b in budgets if table.get((method, b))]
    if not xs:
        return
    stats = [mean_std(list(table[method, b].values())) for b in xs]
    mean = [m for m, _ in stats]
    (line,) = ax.plot(xs, mean, marker="o", ms=3.5, label=_label(method), **style)
    ax.fill_between(xs, [m - sd for m, sd in stats], [m + sd for m, sd in stats],
                    color=line.get_color(), alpha=0.12)


def _axes(ax, budgets: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.set_xlabel("calls per class (log scale)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)


def _footer(fig, results) -> None:
    st = results.settings
    fig.text(0.01, 0.005, f"{st['command']}  ·  {st['machine']}  ·  {st.get('date', '')}  ·  "
             f"{' '.join(st['overrides'])}", fontsize=7, color="0.4")


def plot_curve(results, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios, methods, budgets = _present(results.rows)
    fig, axes = plt.subplots(1, len(scenarios), figsize=(6.5 * len(scenarios), 4.8),
                             squeeze=False)
    styles = {"prompt_only": ":", "teacher_all": "-."}
    for ax, s in zip(axes[0], scenarios, strict=True):
        table = _by(results.rows, s)
        for m in methods:
            if not get_method(m).budgeted:
                v = table.get((m, None))
                if v:
                    ax.axhline(mean_std(list(v.values()))[0], ls=styles.get(m, "--"),
                               color="0.35", lw=1.2, label=_label(m))
                continue
            ls = "--" if m in ("knockoff", "aspkd_plain") or m.endswith("_hard") else "-"
            _band(ax, table, m, budgets, lw=2.4 if m == "aspkd" else 1.4, ls=ls)
        acc = results.scenarios.get(s, {}).get("victim_test_accuracy")
        if acc is not None:
            ax.axhline(acc, color="k", lw=1, label="victim's own test accuracy")
        _axes(ax, budgets)
        ax.set_ylabel("agreement with the victim (%)")
        ax.set_title(f"{s}: mean over seeds, band ± 1 std")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    _footer(fig, results)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_pseudo(results, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios, methods, budgets = _present(results.rows)
    fig, axes = plt.subplots(1, len(scenarios), figsize=(6.5 * len(scenarios), 4.2),
                             squeeze=False)
    for ax, s in zip(axes[0], scenarios, strict=True):
        table = _by(results.rows, s, "pseudo_label_agreement")
        for m in [m for m in methods if _self_paced(m)]:
            _band(ax, table, m, budgets)
        _axes(ax, budgets)
        ax.set_ylabel("kept pseudo-labels the victim shares (%)")
        ax.set_title(f"{s}: pseudo-labels of the last round (paper's Fig. 9)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    _footer(fig, results)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

