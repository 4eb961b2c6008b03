"""A finished sweep's outputs: the results table (CSV and markdown), a PNG of the objective against the most
important hyperparameters, and the best trial's config as a YAML file for ``jobs/bikd_full.py --config``."""

from __future__ import annotations

import csv
import io
import math
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from bikd.config import dump_yaml
from bikd.storage import Storage
from tuning.spaces import trial_config

__all__ = ["trial_rows", "importance", "write_results"]


def trial_rows(grid, sweep) -> list[dict[str, Any]]:
    """One row per trial: id, status (completed / stopped early / error), rounds reported, the last round's
    objective and its sampled values, by trial id."""
    max_t = sweep.base().loop.rounds
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        rounds = int(metrics.get("round", 0))
        status = "error" if result.error else ("completed" if rounds >= max_t else "stopped early")
        rows.append({"trial_id": metrics.get("trial_id") or PurePosixPath(result.path).name, "status": status,
                     "rounds": rounds, "objective": metrics.get("objective"), **dict(result.config)})
    return sorted(rows, key=lambda r: r["trial_id"])


def _is_number(values: list) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def importance(rows: list[dict], keys: list[str]) -> dict[str, float]:
    """How much of the objective's spread each hyperparameter explains, in [0, 1]: |Spearman rho| for a number,
    the correlation ratio (between-group / total standard deviation) for a category."""
    from scipy.stats import spearmanr

    y = np.array([r["objective"] for r in rows], float)
    out = {}
    for key in keys:
        values = [r[key] for r in rows]
        if len(set(map(repr, values))) < 2 or len(y) < 3 or y.std() == 0:
            out[key] = 0.0
        elif _is_number(values):
            rho = spearmanr(values, y).statistic
            out[key] = 0.0 if math.isnan(rho) else abs(float(rho))
        else:
            groups: dict[str, list[float]] = {}
            for v, obj in zip(values, y):
                groups.setdefault(repr(v), []).append(obj)
            between = sum(len(g) * (np.mean(g) - y.mean()) ** 2 for g in groups.values())
            out[key] = float(math.sqrt(between / ((y - y.mean()) ** 2).sum()))
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _plot(rows: list[dict], ranked: dict[str, float], space: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(ranked)[:3] or ["trial_id"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        values = [r[key] for r in rows]
        numeric = _is_number(values)
        labels = sorted({repr(v) for v in values}) if not numeric else []
        for done, marker in ((True, "o"), (False, "x")):
            pts = [(r[key], r["objective"]) for r in rows if (r["status"] == "completed") == done]
            if pts:
                xs = [p[0] if numeric else labels.index(repr(p[0])) for p in pts]
                ax.scatter(xs, [p[1] for p in pts], marker=marker, label="completed" if done else "stopped early / error")
        domain = space.get(key)
        if numeric and domain is not None and type(domain.get_sampler()).__name__ == "LogUniform":
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=7)
        ax.set_title(f"{key} (importance {ranked.get(key, 0):.2f})", fontsize=8)
        ax.set_ylabel("objective (last round)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_results(grid, sweep, storage: Storage) -> dict[str, Any]:
    """results.csv, results.md, objective.png and best.yaml into ``storage`` (the experiment's folder)."""
    space = sweep.search_space()
    keys = [k for k, d in space.items() if hasattr(d, "sample")]
    rows = trial_rows(grid, sweep)
    scored = [r for r in rows if r["objective"] is not None]
    if not scored:
        raise RuntimeError(f"no trial of sweep {sweep.url} reported a round; see the trials' errors in {sweep.url}")
    completed = [r for r in scored if r["status"] == "completed"]
    ranked = importance(completed if len(completed) >= 3 else scored, keys)
    columns = ["trial_id", "status", "rounds", "objective", *ranked]

    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(columns)
    writer.writerows([[r.get(c) for c in columns] for r in rows])
    storage.write_text("results.csv", text.getvalue())

    best = max(completed or scored, key=lambda r: r["objective"])
    lines = [f"| {' | '.join(columns)} |", "|" + "---|" * len(columns)]
    lines += [f"| {' | '.join(_fmt(r.get(c)) for c in columns)} |" for r in sorted(rows, key=lambda r: -(r['objective'] or -math.inf))]
    weights = " + ".join(f"{w:g} x {k}" for k, w in sweep.objective.items())
    md = (f"Sweep `{sweep.name}`: {len(rows)} trials of space `{sweep.space}`, objective {weights} (last round), "
          f"{sum(r['status'] == 'completed' for r in rows)} completed, {sum(r['status'] == 'stopped early' for r in rows)} "
          f"stopped early by ASHA, {sum(r['status'] == 'error' for r in rows)} failed. Best: `{best['trial_id']}`. "
          f"Importance (|Spearman rho| or correlation ratio): "
          + ", ".join(f"{k} {v:.2f}" for k, v in ranked.items()) + "\n\n" + "\n".join(lines) + "\n")
    storage.write_text("results.md", md)
    storage.write_bytes("objective.png", _plot(scored, ranked, space))

    params = {k: best[k] for k in space}
    cfg = trial_config(params, sweep.base_config, (*sweep.base_overrides, "run_dir=runs/bikd_best"))
    header = (f"# the best trial ({best['trial_id']}, objective {best['objective']:.4f}) of sweep {sweep.url}:\n"
              + "".join(f"#   {k}: {_fmt(params[k])}\n" for k in keys))
    storage.write_text("best.yaml", header + dump_yaml(cfg))
    return {"markdown": md, "best_trial": best["trial_id"], "best_objective": best["objective"], "importance": ranked,
            "rows": rows}
