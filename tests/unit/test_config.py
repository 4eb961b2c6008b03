"""The typed config layer: YAML + --set overrides into frozen dataclasses, with errors that name the key."""

from __future__ import annotations  # on purpose: from_dict must resolve string annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass, field
from typing import Literal, Optional

import fsspec
import pytest

from bikd.config import (
    add_config_args,
    apply_overrides,
    config_from_args,
    dump_yaml,
    from_dict,
    load_config,
    to_dict,
)


@dataclass(kw_only=True, frozen=True)
class EvalConfig:
    batch_size: int = 256
    metric: Literal["mrr", "hits@10"] = "mrr"
    ks: tuple[int, ...] = (1, 3, 10)

    def __post_init__(self):
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {self.batch_size}")


@dataclass(kw_only=True, frozen=True)
class OptimConfig:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int | None = None


@dataclass(kw_only=True, frozen=True)
class SchedulerConfig:
    kind: Literal["cosine", "linear"] = "cosine"
    min_lr: float = 0.0


@dataclass(kw_only=True, frozen=True)
class JobConfig:
    name: str  # required
    seed: int = 0
    debug: bool = False
    tags: list[str] = field(default_factory=list)
    loss_weights: dict[str, float] = field(default_factory=dict)
    eval: EvalConfig = field(default_factory=EvalConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=0.01))  # non-trivial component default
    scheduler: Optional[SchedulerConfig] = None


def _write(tmp_path, text: str, name: str = "job.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


JOB_YAML = """\
name: fb15k-kd
seed: 7
tags: [kg, lm]
loss_weights: {kg: 1, lm: 0.5}
eval:
  batch_size: 128
  metric: hits@10
  ks: [1, 5]
optim:
  betas: [0.8, 0.99]
"""


# --- loading -------------------------------------------------------------------------------------------


def test_load_yaml_builds_nested_typed_config(tmp_path):
    cfg = load_config(JobConfig, _write(tmp_path, JOB_YAML))
    assert cfg == JobConfig(
        name="fb15k-kd",
        seed=7,
        tags=["kg", "lm"],
        loss_weights={"kg": 1.0, "lm": 0.5},
        eval=EvalConfig(batch_size=128, metric="hits@10", ks=(1, 5)),
        # lr comes from the field's default instance (0.01), not OptimConfig's class default
        optim=OptimConfig(lr=0.01, betas=(0.8, 0.99)),
    )
    assert isinstance(cfg.eval.ks, tuple) and isinstance(cfg.optim.betas, tuple)
    assert type(cfg.loss_weights["kg"]) is float  # int in YAML, float in the schema
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1  # type: ignore[misc]


def test_no_file_uses_defaults_and_empty_file_too(tmp_path):
    assert load_config(JobConfig, overrides=["name=x"]) == JobConfig(name="x")
    assert load_config(JobConfig, _write(tmp_path, ""), ["name=x"]) == JobConfig(name="x")


def test_fsspec_file_url(tmp_path):
    path = _write(tmp_path, JOB_YAML)
    cfg = load_config(JobConfig, f"file://{path}", ["seed=9"])
    assert (cfg.name, cfg.seed, cfg.eval.batch_size) == ("fb15k-kd", 9, 128)


def test_fsspec_memory_url():
    url = "memory://bikd-test-config/job.yaml"
    with fsspec.open(url, "wt") as f:
        f.write("name: in-memory\neval: {batch_size: 3}\n")
    try:
        cfg = load_config(JobConfig, url)
        assert (cfg.name, cfg.eval.batch_size) == ("in-memory", 3)
    finally:
        fsspec.filesystem("memory").rm(url)


def test_missing_file_names_it(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        load_config(JobConfig, missing)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = _write(tmp_path, "name: x\nseed: 1\neval: [1, 2\nother: 3\n", name="broken.yaml")
    with pytest.raises(ValueError, match=r"invalid YAML in config file .*broken\.yaml, line \d+") as exc:
        load_config(JobConfig, path)
    line = int(re.search(r"line (\d+)", str(exc.value)).group(1))
    assert 3 <= line <= 4  # the unclosed flow sequence opened on line 3; the parser notices by line 4


def test_duplicate_yaml_key_is_an_error_with_its_line(tmp_path):
    path = _write(tmp_path, "name: x\neval:\n  batch_size: 1\n  batch_size: 2\n", name="dup.yaml")
    with pytest.raises(ValueError, match=r"dup\.yaml, line 4, column 3: duplicate key 'batch_size'"):
        load_config(JobConfig, path)


def test_yaml_merge_keys_may_be_overridden(tmp_path):
    # the duplicate-key check must not flag a key that overrides one pulled in by `<<:`
    path = _write(tmp_path, "name: x\nscheduler:\n  <<: {kind: linear, min_lr: 0.1}\n  min_lr: 0.2\n")
    assert load_config(JobConfig, path).scheduler == SchedulerConfig(kind="linear", min_lr=0.2)


def test_top_level_must_be_a_mapping(tmp_path):
    path = _write(tmp_path, "- a\n- b\n", name="list.yaml")
    with pytest.raises(ValueError, match=r"list\.yaml: the top level must be a mapping"):
        load_config(JobConfig, path)


# --- overrides -----------------------------------------------------------------------------------------


def test_overrides_nested_and_typed(tmp_path):
    cfg = load_config(
        JobConfig,
        _write(tmp_path, JOB_YAML),
        [
            "eval.batch_size=512",
            "optim.lr=1",  # int accepted for a float field, stored as float
            "optim.warmup_steps=100",
            "tags=[a, b, c]",
            "debug=true",
            "name=run-2",  # a plain string stays a string
            "loss_weights.kg=2.5",
            "scheduler.kind=linear",  # builds an Optional component that was None
        ],
    )
    assert cfg.eval == EvalConfig(batch_size=512, metric="hits@10", ks=(1, 5))
    assert cfg.optim == OptimConfig(lr=1.0, betas=(0.8, 0.99), warmup_steps=100) and type(cfg.optim.lr) is float
    assert cfg.tags == ["a", "b", "c"] and cfg.debug is True and cfg.name == "run-2"
    assert cfg.loss_weights == {"kg": 2.5, "lm": 0.5}
    assert cfg.scheduler == SchedulerConfig(kind="linear")


def test_overrides_apply_in_order_and_null_clears():
    cfg = load_config(JobConfig, overrides=["name=x", "seed=1", "seed=2", "optim.warmup_steps=5", "optim.warmup_steps=null"])
    assert cfg.seed == 2 and cfg.optim.warmup_steps is None
    assert cfg.optim.lr == 0.01  # other values of the component's default survive a partial override


def test_apply_overrides_copies_and_parses_yaml_values():
    data = {"eval": {"batch_size": 1}}
    out = apply_overrides(data, ["eval.batch_size=2", "a.b.c=[1, 2]", "x=0.1", "y=hello world", 'z="3"'])
    assert data == {"eval": {"batch_size": 1}}  # input untouched
    assert out == {"eval": {"batch_size": 2}, "a": {"b": {"c": [1, 2]}}, "x": 0.1, "y": "hello world", "z": "3"}


@pytest.mark.parametrize("bad", ["seed", "=3", "eval..batch_size=1", ".seed=1", "seed.=1"])
def test_malformed_override(bad):
    with pytest.raises(ValueError, match=f"malformed override {re.escape(repr(bad))}"):
        apply_overrides({}, [bad])


def test_override_through_a_scalar_is_an_error():
    with pytest.raises(ValueError, match=r"'seed\.x=1': 'seed' is 3 \(int\), not a mapping"):
        apply_overrides({"seed": 3}, ["seed.x=1"])


def test_override_value_with_bad_yaml():
    with pytest.raises(ValueError, match=r"override 'tags=\[a, b': value is not valid YAML"):
        apply_overrides({}, ["tags=[a, b"])


# --- validation errors ---------------------------------------------------------------------------------


def test_unknown_top_level_key_names_it_and_suggests():
    with pytest.raises(ValueError) as exc:
        from_dict(JobConfig, {"name": "x", "sede": 1})
    msg = str(exc.value)
    assert "unknown config key 'sede' at 'sede' (did you mean 'seed'?)" in msg
    assert "valid keys for JobConfig at the top level: name, seed, debug, tags" in msg


def test_unknown_nested_key_from_override_shows_dotted_path():
    with pytest.raises(ValueError) as exc:
        load_config(JobConfig, overrides=["name=x", "eval.bach_size=1"])
    msg = str(exc.value)
    assert "unknown config key 'bach_size' at 'eval.bach_size' (did you mean 'batch_size'?)" in msg
    assert "valid keys for EvalConfig at 'eval': batch_size, metric, ks" in msg


def test_unknown_key_without_close_match_has_no_suggestion():
    with pytest.raises(ValueError, match="unknown config key 'zzz' at 'zzz'; valid keys") as exc:
        from_dict(JobConfig, {"name": "x", "zzz": 1})
    assert "did you mean" not in str(exc.value)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"seed": "abc"}, r"'seed': expected int, got 'abc' \(str\)"),
        ({"seed": True}, r"'seed': expected int, got True \(bool\)"),
        ({"seed": 1.5}, r"'seed': expected int, got 1\.5 \(float\)"),
        ({"debug": "yes"}, r"'debug': expected bool, got 'yes' \(str\)"),
        ({"debug": 1}, r"'debug': expected bool, got 1 \(int\)"),
        ({"optim": {"lr": False}}, r"'optim\.lr': expected float, got False \(bool\)"),
        ({"optim": {"lr": "1e-3"}}, r"'optim\.lr': expected float, got '1e-3' \(str\)"),
        ({"optim": {"warmup_steps": 0.5}}, r"'optim\.warmup_steps': expected int, got 0\.5 \(float\)"),
        ({"name": 2024}, r"'name': expected str, got 2024 \(int\); quote it to pass a string"),
        ({"tags": "kg"}, r"'tags': expected list\[str\], got 'kg' \(str\)"),
        ({"tags": ["kg", 3]}, r"'tags\[1\]': expected str, got 3 \(int\)"),
        ({"eval": {"ks": [1, "x"]}}, r"'eval\.ks\[1\]': expected int, got 'x' \(str\)"),
        ({"optim": {"betas": [0.9]}}, r"'optim\.betas': expected tuple\[float, float\], got \[0\.9\] \(list\); it needs exactly 2 items"),
        ({"loss_weights": {"kg": "high"}}, r"'loss_weights\.kg': expected float, got 'high' \(str\)"),
        ({"eval": 5}, r"'eval': expected a mapping for EvalConfig, got 5 \(int\)"),
        ({"scheduler": {"kind": "cosine", "min_lr": "x"}}, r"'scheduler\.min_lr': expected float"),
    ],
)
def test_type_errors_name_path_type_and_value(data, expected):
    with pytest.raises(ValueError, match=expected):
        from_dict(JobConfig, {"name": "x", **data})


def test_literal_violation_lists_choices_and_suggests():
    with pytest.raises(ValueError, match=r"'eval\.metric': expected one of 'mrr', 'hits@10', got 'mmr' \(str\) \(did you mean 'mrr'\?\)"):
        load_config(JobConfig, overrides=["name=x", "eval.metric=mmr"])


def test_literal_compares_types_not_just_values():
    @dataclass(kw_only=True, frozen=True)
    class Flags:
        level: Literal[0, 1] = 0  # True == 1 in Python, but YAML `true` is not the level 1

    assert from_dict(Flags, {"level": 1}).level == 1
    with pytest.raises(ValueError, match=r"'level': expected one of 0, 1, got True \(bool\)"):
        from_dict(Flags, {"level": True})


def test_range_violation_from_post_init_names_component_and_field():
    with pytest.raises(ValueError, match=r"invalid EvalConfig at 'eval': batch_size must be > 0, got 0"):
        load_config(JobConfig, overrides=["name=x", "eval.batch_size=0"])


def test_missing_required_field():
    with pytest.raises(ValueError, match=r"missing required config key\(s\) for JobConfig at the top level: name"):
        load_config(JobConfig)


def test_root_must_be_a_mapping_and_cls_a_dataclass():
    with pytest.raises(ValueError, match=r"expected a mapping for JobConfig, got \[1\] \(list\)"):
        from_dict(JobConfig, [1])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not a dataclass"):
        from_dict(dict, {})  # type: ignore[arg-type]


def test_unsupported_annotation_is_a_schema_error():
    @dataclass(kw_only=True, frozen=True)
    class Bad:
        x: set = dataclasses.field(default_factory=set)  # builtins resolve even for a local class

    with pytest.raises(TypeError, match="'x': unsupported field type set"):
        from_dict(Bad, {"x": [1]})


def test_component_instances_are_accepted_as_values():
    cfg = from_dict(JobConfig, {"name": "x", "eval": EvalConfig(batch_size=3)})
    assert cfg.eval == EvalConfig(batch_size=3)


# --- round trip & dump ---------------------------------------------------------------------------------


def test_round_trip_to_dict_from_dict_and_yaml(tmp_path):
    cfg = JobConfig(
        name="yes",  # would become a bool if dumped unquoted
        seed=3,
        debug=True,
        tags=["a"],
        loss_weights={"kg": 0.25},
        eval=EvalConfig(metric="hits@10", ks=(10,)),
        optim=OptimConfig(betas=(0.5, 0.6), warmup_steps=10),
        scheduler=SchedulerConfig(kind="linear", min_lr=1e-5),
    )
    data = to_dict(cfg)
    assert data["eval"] == {"batch_size": 256, "metric": "hits@10", "ks": [10]}  # plain lists, not tuples
    assert data["scheduler"] == {"kind": "linear", "min_lr": 1e-5}
    assert from_dict(JobConfig, data) == cfg
    text = dump_yaml(cfg)
    assert text.startswith("name: 'yes'\nseed: 3\n")  # field order, strings that look like bools quoted
    assert load_config(JobConfig, _write(tmp_path, text)) == cfg
    assert to_dict(JobConfig(name="d"))["scheduler"] is None
    with pytest.raises(TypeError):
        to_dict(JobConfig)


# --- argparse ------------------------------------------------------------------------------------------


def test_argparse_helpers(tmp_path):
    parser = add_config_args(argparse.ArgumentParser())
    path = _write(tmp_path, JOB_YAML)
    args = parser.parse_args(["--config", path, "--set", "seed=3", "--set", "eval.batch_size=64"])
    cfg = config_from_args(JobConfig, args)
    assert (cfg.name, cfg.seed, cfg.eval.batch_size, cfg.eval.metric) == ("fb15k-kd", 3, 64, "hits@10")

    assert config_from_args(JobConfig, parser.parse_args(["--set", "name=bare"])) == JobConfig(name="bare")
    # a second parse must not see the first parse's --set values (argparse's shared-default pitfall)
    assert parser.parse_args([]).overrides is None
    with pytest.raises(ValueError, match="missing required"):
        config_from_args(JobConfig, parser.parse_args([]))
