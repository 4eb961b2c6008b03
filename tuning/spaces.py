"""Search spaces as code: dotted config keys (``--set`` syntax) mapped to Ray Tune domains.

A trial's config is the job's base config (the embedded default, or ``--config``) plus the trial's sampled
values written as ``--set`` overrides, built and checked by the same code as ``jobs/bikd_full.py --set``; so a
space is checked before any trial starts (:func:`check_space`: every key exists, every sampled value fits),
and the best trial's overrides are a config ``jobs/bikd_full.py --config`` accepts unchanged.

Ranges: the KD weights span 0.01 to 1 on a log scale (on held-out SQuAD articles 0.03 beat the default 1.0
by a wide margin, docs/BENCHMARKS.md); the packaged MiniLM has 6 layers (0-5) to fuse after.
"""

from __future__ import annotations

from typing import Any

import yaml
from ray import tune

from bikd.config import load_config
from bikd.driver import BikdConfig

__all__ = ["SPACES", "check_space", "overrides", "trial_config"]

#: name -> {dotted key: Ray Tune domain}; "fusion" sweeps the KG -> LM side, "full" both sides and the exchange
SPACES: dict[str, dict[str, Any]] = {
    "fusion": {
        "lm.fusion.layers": tune.choice([[1], [3], [5], [1, 3], [3, 5]]),
        "lm.fusion.gate": tune.choice(["vector", "scalar"]),
        "lm.fusion.gate_init": tune.choice([0.0, 0.1, 0.5]),
        "lm.kd.entity_weight": tune.loguniform(0.01, 1.0),
        "lm.kd.relation_weight": tune.loguniform(0.01, 1.0),
        "lm.kd.temperature": tune.loguniform(0.5, 4.0),
        "lm.train.lr": tune.loguniform(2e-5, 3e-4),
    },
}
SPACES["full"] = {
    **SPACES["fusion"],
    "mine.mining.thresholds.target_precision": tune.uniform(0.3, 0.9),
    "mine.mining.thresholds.top_k": tune.choice([20, 50, 100, 200]),
    "kge.reverse_kd.weight": tune.loguniform(0.01, 1.0),
    "kge.optimizer.lr": tune.loguniform(0.01, 0.5),
    "kge.model.name": tune.choice(["transe", "distmult", "complex", "rotate"]),
    "kge.model.dim": tune.choice([32, 64, 128]),
    # constants: the default's TransE-only settings back to what every model accepts (its own defaults)
    "kge.model.normalize_entities": True,
    "kge.model.init_scale": None,
    "exchange.kge_publish_epochs": tune.choice([1, 2, 5]),
    "exchange.lm_poll_steps": tune.choice([5, 10, 20]),
}


def overrides(params: dict[str, Any]) -> list[str]:
    """{dotted key: value} -> ``key=value`` strings, values written as YAML (what ``--set`` parses back)."""
    out = []
    for key, value in params.items():
        text = yaml.safe_dump(value, default_flow_style=True).strip()
        out.append(f"{key}={text.removesuffix('...').strip()}")  # safe_dump ends a plain scalar with '...'
    return out


def trial_config(params: dict[str, Any], base: str | None = None, base_overrides: tuple[str, ...] = ()) -> BikdConfig:
    """The config a trial runs: ``base`` (a YAML path or URL; None: the defaults), then ``base_overrides``,
    then the trial's ``params``. ValueError names the key when a value does not fit."""
    return load_config(BikdConfig, base, [*base_overrides, *overrides(params)])


def check_space(space: dict[str, Any], base: str | None = None, base_overrides: tuple[str, ...] = (),
                num_samples: int = 8, seed: int = 0) -> None:
    """Build the config of ``num_samples`` random points of ``space`` (and of each categorical value): every
    key must be a config key and every value one it takes, or ValueError before any trial starts."""
    import random

    rng = random.Random(seed)

    def draw(domain):  # a Ray Tune domain, or a constant
        return domain.sample(random_state=rng.randrange(2**31)) if hasattr(domain, "sample") else domain

    constants = {k: d for k, d in space.items() if not hasattr(d, "sample")}
    for key, domain in space.items():
        values = list(domain.categories) if hasattr(domain, "categories") else []
        values += [draw(domain) for _ in range(2)]
        for value in values:
            try:
                trial_config({**constants, key: value}, base, base_overrides)
            except (ValueError, TypeError) as error:
                raise ValueError(f"search space key {key!r} with value {value!r}: {error}") from error
    for i in range(num_samples):
        point = {k: draw(d) for k, d in space.items()}
        try:
            trial_config(point, base, base_overrides)
        except (ValueError, TypeError) as error:
            raise ValueError(f"search space point {i} {point}: {error}") from error
