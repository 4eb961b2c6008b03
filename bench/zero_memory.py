"""Peak memory per worker under DeepSpeed ZeRO-0/2/3 with 2 Ray Train workers, BERT-large-sized encoder.

Each stage runs in fresh worker processes (Ray Train's ``TorchTrainer``, 2 workers, gloo on CPU), with the
DeepSpeed config bikd's LM job builds (``bikd.ray.lm_train.deepspeed_config``: AdamW through torch, fp32 on
CPU). The model is a randomly initialised BERT-large-sized encoder (24 layers, hidden 1024, 16 heads,
~335M parameters) with a 2-way classification head, so that model state (parameters, gradients, Adam
moments: 16 bytes per parameter unpartitioned) dominates a worker's memory; batches are small (2 x 128
tokens of random ids). ZeRO-3 builds the model inside ``deepspeed.zero.Init`` so no worker ever holds it
whole. Peak resident memory is the worker process's ``ru_maxrss`` after the timed steps (its whole life:
model build, ``deepspeed.initialize`` and the steps), the larger of the two workers; it is also split into
the peak up to the end of ``deepspeed.initialize`` and the peaks of each step's forward, backward and
optimizer step (``VmHWM``, reset through ``/proc/self/clear_refs`` before each phase). The step time is the median of the timed steps on rank 0 (all ranks
step together).

    python bench/zero_memory.py [--stages 0,2,3] [--steps 6]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import add_common_args, start_run  # noqa: E402

BERT_LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)


def loop(config: dict) -> dict:
    import resource

    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers import BertConfig, BertModel

    from bikd.ray.lm_train import (DeepSpeedConfig, LMJobConfig, TrainConfig, deepspeed_config, set_malloc_mmap_threshold,
                                   skip_shm_comm_build)

    torch.set_num_threads(1)
    stage, batch, seq = config["stage"], config["batch_size"], config["seq_len"]
    names = {"mmap_threshold": "malloc_mmap_threshold", "bucket_numel": "bucket_numel", "max_live_numel": "max_live_numel"}
    extra = {field: config[key] for key, field in names.items() if config[key] is not None}
    job = LMJobConfig(train=TrainConfig(batch_size=batch, lr=1e-5), deepspeed=DeepSpeedConfig(zero_stage=stage, bf16=False, **extra))
    set_malloc_mmap_threshold(job.deepspeed.malloc_mmap_threshold)  # as bikd's LM job does on CPU
    skip_shm_comm_build()
    ds = deepspeed_config(job, total_steps=config["steps"] + 1, bf16=False)

    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            # no padding row: transformers' init zeroes embedding[padding_idx], which indexes an empty
            # tensor when zero.Init has already partitioned the parameter
            self.encoder = BertModel(BertConfig(**BERT_LARGE, vocab_size=30522, pad_token_id=None), add_pooling_layer=False)
            self.head = torch.nn.Linear(BERT_LARGE["hidden_size"], 2)

        def forward(self, ids, labels):
            hidden = self.encoder(input_ids=ids).last_hidden_state[:, 0]
            return torch.nn.functional.cross_entropy(self.head(hidden), labels)

    with deepspeed.zero.Init(enabled=stage == 3, config_dict_or_path=ds):
        model = Classifier()
    num_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    init_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    g = torch.Generator().manual_seed(dist.get_rank())
    def phase_peak_mb() -> float:  # VmHWM since the last reset, then reset it to the current RSS
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        Path("/proc/self/clear_refs").write_text("5")
        return int(status["VmHWM"].split()[0]) / 1024

    times, phases = [], {"forward": 0.0, "backward": 0.0, "step": 0.0}
    phase_peak_mb()  # from here on: the steps only
    for step in range(config["steps"] + 1):  # the first step (allocations, first all-gathers) is not timed
        ids, labels = torch.randint(30522, (batch, seq), generator=g), torch.randint(2, (batch,), generator=g)
        start = time.perf_counter()
        loss = engine(ids, labels)
        phases["forward"] = max(phases["forward"], phase_peak_mb())
        engine.backward(loss)
        phases["backward"] = max(phases["backward"], phase_peak_mb())
        engine.step()
        phases["step"] = max(phases["step"], phase_peak_mb())
        if step:
            times.append(time.perf_counter() - start)
    steps_peak_mb = max(phases.values())
    mine = {"peak": max(init_peak_mb, steps_peak_mb), "init": init_peak_mb, "steps": steps_peak_mb, **phases}
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, mine)
    # Ray Train (v2) hands rank 0's return value back as Result.return_value
    return {"peak_rss_mb": max(r["peak"] for r in ranks), "init_peak_rss_mb": max(r["init"] for r in ranks),
            "steps_peak_rss_mb": max(r["steps"] for r in ranks), "per_rank": ranks,
            "phase_peak_rss_mb": {k: max(r[k] for r in ranks) for k in phases},
            "step_s": statistics.median(times), "step_s_all": times, "num_params": num_params,
            "zero_optimization": ds["zero_optimization"]}


def run_stage(stage: int, args) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(loop, train_loop_config={"stage": stage, "steps": args.steps, "batch_size": args.batch_size,
                                                    "seq_len": args.seq_len, "mmap_threshold": args.mmap_threshold,
                                                    "bucket_numel": args.bucket_numel, "max_live_numel": args.max_live_numel},
                           torch_config=TorchConfig(backend="gloo"),
                           scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
                           run_config=RunConfig(name=f"zero_memory_stage{stage}", storage_path=args.storage))
    return trainer.fit().return_value | {"stage": stage}


def main() -> None:
    import ray

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stages", default="0,2,3")
    p.add_argument("--steps", type=int, default=6, help="timed steps per stage (after one untimed); step times are noisy")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--storage", default="/tmp/bikd_zero_memory")
    p.add_argument("--mmap-threshold", type=int, default=None,
                   help="deepspeed.malloc_mmap_threshold (bytes; 0: glibc's adaptive default); default: bikd's")
    p.add_argument("--out-dir", default=None, help="results folder (default bench/results)")
    p.add_argument("--bucket-numel", type=int, default=None, help="deepspeed.bucket_numel; default: bikd's")
    p.add_argument("--max-live-numel", type=int, default=None, help="deepspeed.max_live_numel; default: bikd's")
    add_common_args(p)
    args = p.parse_args()
    run = start_run("zero_memory", args)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        runs = {}
        for stage in (int(s) for s in args.stages.split(",")):
            runs[stage] = run_stage(stage, args)
            r = runs[stage]
            print(f"ZeRO-{stage}: peak RSS per worker {r['peak_rss_mb']:,.0f} MB (init {r['init_peak_rss_mb']:,.0f}, "
                  f"steps {r['steps_peak_rss_mb']:,.0f}; {r['phase_peak_rss_mb']}), step {r['step_s']:.2f} s", flush=True)
    finally:
        ray.shutdown()
    metrics = {f"peak_rss_mb_zero{s}": r["peak_rss_mb"] for s, r in runs.items()}
    metrics |= {f"steps_peak_rss_mb_zero{s}": r["steps_peak_rss_mb"] for s, r in runs.items()}
    metrics |= {f"step_s_zero{s}": r["step_s"] for s, r in runs.items()}
    if 0 in runs and 3 in runs:
        metrics["zero3_vs_zero0_memory"] = runs[3]["peak_rss_mb"] / runs[0]["peak_rss_mb"]
        metrics["zero3_vs_zero0_step_time"] = runs[3]["step_s"] / runs[0]["step_s"]
    if 0 in runs and 2 in runs:
        metrics["zero2_vs_zero0_memory"] = runs[2]["peak_rss_mb"] / runs[0]["peak_rss_mb"]
    metrics["num_params"] = next(iter(runs.values()))["num_params"]
    details = {"model": f"random BertModel {BERT_LARGE} + Linear(1024, 2)", "workers": "2 Ray Train workers, 1 CPU and "
               "1 torch thread each, gloo", "batch": f"{args.batch_size} x {args.seq_len} random token ids per worker",
               "optimizer": "DeepSpeed AdamW (torch_adam), fp32", "runs": {str(s): r for s, r in runs.items()}}
    print(run.write(metrics, details, out_dir=Path(args.out_dir) if args.out_dir else None))


if __name__ == "__main__":
    main()
