"""Distributed fused-LM training (bikd/ray/lm_train.py) on a local Ray instance: 2 CPU workers, a tiny random
BERT, triple classification on UMLS. ZeRO-3 with a worker killed mid-run, ZeRO-2 checkpointing to S3 (moto);
a second run resumes from the first one's checkpoint with equal weights; the export reloads with equal weights."""

from __future__ import annotations

import pytest

from bikd.config import apply_overrides, from_dict
from bikd.lm.train import load_fused, state_digest
from bikd.ray.lm_train import LMJobConfig, deepspeed_config, run
from bikd.storage import Storage

pytestmark = pytest.mark.slow

BASE = {
    "encoder": {"name_or_path": "tiny", "attn_implementation": "eager"},
    "fusion": {"layers": [1]},
    "kd": {"num_sampled_candidates": 8},
    "kg": {"train": {"epochs": 1, "batch_size": 1024, "model": {"name": "distmult", "dim": 8}}},
    "task": {"max_train": 16, "max_eval": 8, "link": True, "triple_cls": {"max_length": 24}},
    "train": {"batch_size": 4, "eval_batch_size": 16, "checkpoint_every": 2, "log_every": 2, "lr": 1e-3},
    "num_workers": 2, "cpus_per_worker": 1.0, "name": "run", "debug": {"param_digest": True},
}


def job(*overrides: str, **fields) -> LMJobConfig:
    return from_dict(LMJobConfig, apply_overrides({**BASE, **fields}, overrides))


def check_export(result, **storage_options) -> None:
    """The export holds exactly the weights of the last checkpoint (ZeRO partitions gathered in fp32)."""
    back = load_fused(Storage(result.metrics["export"], storage_options))
    assert state_digest(back.state_dict()) == result.metrics["param_digest"]


def test_zero3_worker_killed_resumes_then_a_second_run_continues(ray_local, tmp_path):
    marker = tmp_path / "killed"
    first = run(job("deepspeed.zero_stage=3", "train.steps=4", "debug.fail_at_step=3", f"debug.marker={marker}",
                    storage_path=str(tmp_path / "ckpt"), max_failures=1))
    # rank 1 died after step 3; the worker group restarted from the step-2 checkpoint and finished
    assert marker.read_text().startswith("rank 1 exited at step 3")
    assert first.metrics["step"] == 4 and first.metrics["resumed_from_step"] == 2
    # the step-2 report comes back with its checkpoint, step 4 is the attempt after the restart
    assert [row["step"] for row in first.return_value["history"]] == [2, 4]
    assert 0.0 <= first.metrics["eval_accuracy"] <= 1.0 and first.metrics["task_loss"] > 0
    assert first.metrics["kd_entity_loss"] > 0 and first.metrics["kd_relation_loss"] > 0
    assert sorted(p.name for p in (tmp_path / "ckpt" / "run" / "checkpoint_000000004" / "deepspeed").iterdir()) == [
        f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in (0, 1) for kind in ("model", "optim")]
    check_export(first)

    second = run(job("deepspeed.zero_stage=3", "train.steps=6", storage_path=str(tmp_path / "ckpt")))
    assert second.metrics["resumed_from_step"] == 4 and second.metrics["step"] == 6
    assert [row["step"] for row in second.return_value["history"]] == [2, 4, 6]  # the whole history, not since the resume
    assert second.metrics["resume_digest"] == first.metrics["param_digest"]  # weights as checkpointed
    assert second.metrics["param_digest"] != first.metrics["param_digest"]
    check_export(second)


def test_zero2_checkpoints_on_s3_and_a_second_run_resumes(ray_local, s3_url, s3_endpoint):
    options = {"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing"}  # workers may predate the env vars
    url = f"{s3_url}/lm"
    first = run(job("deepspeed.zero_stage=2", "train.steps=2", storage_path=url, storage_options=options))
    assert first.metrics["step"] == 2 and first.metrics["resumed_from_step"] is None
    files = Storage(f"{url}/run/checkpoint_000000002", options)
    assert files.ls("deepspeed") == ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                     "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert first.metrics["export"] == f"{url}/run/export"
    check_export(first, **options)

    second = run(job("deepspeed.zero_stage=2", "train.steps=4", storage_path=url, storage_options=options))
    assert second.metrics["resumed_from_step"] == 2 and second.metrics["step"] == 4
    assert second.metrics["resume_digest"] == first.metrics["param_digest"]
    check_export(second, **options)


def test_zero2_in_bf16_on_cpu_trains_resumes_and_exports_fp32_masters(ray_local, tmp_path):
    """The bf16 path (autocast + DeepSpeed's bf16 optimizer with fp32 master weights), run on CPU."""
    first = run(job("deepspeed.zero_stage=2", "deepspeed.bf16=true", "train.steps=2", storage_path=str(tmp_path)))
    assert first.metrics["bf16"] is True and first.metrics["step"] == 2
    assert 0 < first.metrics["task_loss"] < 10 and first.metrics["kd_entity_loss"] > 0
    check_export(first)  # the fp32 masters, not bf16 copies
    second = run(job("deepspeed.zero_stage=2", "deepspeed.bf16=true", "train.steps=4", storage_path=str(tmp_path)))
    assert second.metrics["resumed_from_step"] == 2 and second.metrics["resume_digest"] == first.metrics["param_digest"]


@pytest.mark.parametrize("override, message", [
    ("fusion.layers=[3]", "fusion.layers [3]: encoder 'tiny' has 2 layers"),
    ("num_workers=3", "3 workers x 1.0 CPUs (use_gpu=False) do not fit the Ray cluster"),
    ("task.name=qa", "no such file (SQuAD v1.1 dev JSON)"),
])
def test_bad_config_fails_before_any_worker_starts(ray_local, tmp_path, override, message):
    extra = ("task.squad_path=" + str(tmp_path / "missing.json"),) if override.startswith("task.") else ()
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")):
        run(job(override, *extra, storage_path=str(tmp_path / "ckpt")))
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("override, message", [
    ("deepspeed.zero_stage=4", "zero_stage must be 0, 1, 2 or 3"),
    ("deepspeed.bf16=sometimes", "'deepspeed.bf16': expected Union\\[bool, Literal\\['auto'\\]\\], got 'sometimes'"),
    ("debug.fail_at_step=2", "needs debug.marker"),
    ("train.stepz=2", "unknown config key 'stepz'"),
    ("deepspeed.bucket_numel=0", "bucket_numel must be > 0"),
    ("deepspeed.malloc_mmap_threshold=-1", "malloc_mmap_threshold must be in"),
])
def test_invalid_values_are_rejected_when_the_config_is_built(override, message):
    with pytest.raises(ValueError, match=message):
        job(override)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_config_per_stage(stage):
    ds = deepspeed_config(job(f"deepspeed.zero_stage={stage}", "train.warmup_steps=5"), total_steps=50, bf16=False,
                          persist_numel=300_000)
    assert ds["zero_optimization"]["stage"] == stage and ds["bf16"] == {"enabled": False}
    assert ds["optimizer"]["params"]["torch_adam"] and ds["scheduler"]["params"]["total_num_steps"] == 50
    if stage == 3:  # the conditionally used modules stay whole on every rank; no trace-based prefetching
        assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 300_001
        assert ds["zero_optimization"]["stage3_prefetch_bucket_size"] == 0
        assert ds["zero_optimization"]["stage3_max_live_parameters"] == 50_000_000
    if stage:  # bounded buffers: DeepSpeed's default bucket is 2 GB of fp32
        assert ds["zero_optimization"]["reduce_bucket_size"] == 20_000_000


def test_malloc_mmap_threshold_gives_freed_parameter_memory_back_to_the_os():
    """What ZeRO-3 needs on CPU: parameters gathered and freed every step must not stay in glibc's heap."""
    import subprocess
    import sys
    code = """
import torch
from pathlib import Path
from bikd.ray.lm_train import set_malloc_mmap_threshold
rss = lambda: int(Path('/proc/self/statm').read_text().split()[1]) * 4096 / 2**20
assert set_malloc_mmap_threshold(1 << 20) and not set_malloc_mmap_threshold(0)
base = rss()
for _ in range(3):  # as ZeRO-3: gather (allocate) every layer's weights, use, release
    ws = [torch.ones(1024, 1024) for _ in range(96)]  # 96 x 4 MiB
    del ws
print(rss() - base)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(out.stdout) < 64, f"{out.stdout} MiB still resident after freeing 384 MiB"
