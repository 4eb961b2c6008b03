"""A run directory's human-readable side, rebuilt from ``metrics.jsonl`` after every round (so a resumed run's
report is the same as an uninterrupted one's): ``report.md`` with PNG plots (matplotlib) and TensorBoard event
files (tensorboardX) under ``tensorboard/``. Written locally, then copied into the run directory (any URL).
"""

from __future__ import annotations

import glob
import io
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

from bikd.storage import Storage

__all__ = ["PLOTS", "write_report", "write_tensorboard"]

#: file -> (title, y label, [(metric key, legend label)])
PLOTS: dict[str, tuple[str, str, list[tuple[str, str]]]] = {
    "kg.png": ("KG side: filtered MRR on valid", "MRR", [("kg_valid_mrr", "KGE")]),
    "lm.png": ("LM task on valid", "metric", [("eval_accuracy", "accuracy, KG table"), ("eval_nokg_accuracy", "accuracy, table withheld"),
                                             ("eval_f1", "F1, KG table"), ("eval_nokg_f1", "F1, table withheld")]),
    "probe.png": ("Knowledge probe (cloze, valid triples)", "P@1", [("probe_p1", "KG table"), ("probe_nokg_p1", "table withheld")]),
    "exchange.png": ("Exchange", "count", [("mined", "mined triples"), ("kge_added_triples", "triples added to KGE"),
                                           ("kg_staleness", "LM snapshot staleness (versions)")]),
}


def _numeric(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["round"], float(r[key])) for r in rows if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
    return [p[0] for p in pts], [p[1] for p in pts]


def _plot(rows, title: str, ylabel: str, series) -> bytes | None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = [(label, *_numeric(rows, key)) for key, label in series]
    drawn = [d for d in drawn if d[1]]
    if not drawn:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    for label, xs, ys in drawn:
        ax.plot(xs, ys, marker="o", label=label)
    ax.set(title=title, xlabel="round", ylabel=ylabel)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})  # no version stamp: same rows, same bytes
    plt.close(fig)
    return buf.getvalue()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:.0f}"
    return "" if v is None else str(v)


COLUMNS = ("round", "kg_valid_mrr", "eval_accuracy", "eval_nokg_accuracy", "eval_f1", "eval_nokg_f1", "probe_p1",
           "probe_nokg_p1", "mined", "kg_version", "kge_added_triples", "kg_staleness", "kge_triples_per_s",
           "rows_per_s", "wall_s")


def write_report(storage: Storage, rows: Sequence[Mapping[str, Any]], *, title: str, final: Mapping[str, Any] | None = None) -> None:
    """``report.md`` and the PNGs of :data:`PLOTS` under ``storage`` (the run directory)."""
    lines = [f"# {title}", ""]
    if final:
        lines += [f"Finished after round {final.get('round')} ({final.get('stopped_by')}).", ""]
        if final.get("kg_test"):
            lines += ["KG test (filtered, read once at the end): " + ", ".join(f"{k} {_fmt(v)}" for k, v in final["kg_test"].items()), ""]
        if final.get("lm_test"):
            lines += ["LM test (read once at the end; nokg_: the KG table withheld): "
                      + ", ".join(f"{k} {_fmt(v)}" for k, v in final["lm_test"].items()), ""]
    cols = [c for c in COLUMNS if any(c in r for r in rows)]
    lines += ["## Per round (valid)", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    lines.append("")
    for name, (plot_title, ylabel, series) in PLOTS.items():
        png = _plot(rows, plot_title, ylabel, series)
        if png is not None:
            storage.write_bytes(name, png)
            lines += [f"![{plot_title}]({name})", ""]
    samples = [(r["round"], s) for r in rows for s in r.get("mined_sample") or []]
    if samples:
        lines += ["## Mined triples (a sample per round, with their evidence)", "", "| round | triple | confidence | evidence |",
                  "|---|---|---|---|"]
        for rnd, s in samples:
            evidence = " ".join(str(s.get("evidence", "")).split()).replace("|", "\\|")
            lines.append(f"| {rnd} | {' '.join(s['triple'])} | {_fmt(s['confidence'])} | {evidence} |")
        lines.append("")
    storage.write_text("report.md", "\n".join(lines))


def write_tensorboard(storage: Storage, rows: Sequence[Mapping[str, Any]]) -> None:
    """Every numeric per-round metric as a TensorBoard scalar (step = round), in one event file under
    ``tensorboard/`` (rewritten whole, so a resumed run's file has each round once)."""
    from tensorboardX import SummaryWriter

    with tempfile.TemporaryDirectory() as tmp:
        writer = SummaryWriter(tmp, filename_suffix=".bikd")
        for r in rows:
            for key, value in r.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "round":
                    writer.add_scalar(key, value, global_step=int(r["round"]), walltime=float(r["round"]))
        writer.close()
        (path,) = glob.glob(os.path.join(tmp, "events.out.tfevents.*"))
        data = open(path, "rb").read()
    for old in storage.ls("tensorboard") if storage.exists("tensorboard") else []:
        storage.delete(f"tensorboard/{old}")
    storage.write_bytes("tensorboard/events.out.tfevents.bikd", data)
