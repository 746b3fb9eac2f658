"""The quality benchmark: the paper's Table 3 ablation and budget curve on the embedded
scenarios, with paired seeds and bootstrap confidence intervals (`scripts/bench_quality.py`).

`methods` names what is compared (config switches over one code path), `cell` runs one
(scenario, method, budget, seed) attack in process, `stats` pairs seeds, `report` writes the
table and plots, `runner` spreads the cells over Ray and resumes.
"""
