"""The bidirectional loop: the KGE side (ShardedKGE on Ray actors), the LM side (DeepSpeed under Ray Train) and
the mining pool, meeting at a named Exchange actor and in one run directory.

One round, ``sync`` mode (alternating, reproducible on CPU):

    KGE   add the KG store's newly mined triples (weights: the miner's confidences), train
          ``kge_epochs_per_round`` epochs, publish snapshot r (object store + run_dir/kge/snapshots/v..r),
          checkpoint, evaluate (filtered MRR on valid)
    LM    the driver allows LM round r; the LM trains ``lm_steps_per_round`` more steps (at the first it polls
          the exchange and swaps in snapshot r), evaluates the task with and without the table, exports
          (run_dir/lm/exports/round-r), checkpoints, and posts the round to the exchange actor
    LM->KG  (directions=both) an extractor fine-tuned from the LM export's encoder scores the round's
          candidates on the mining pool; the accepted triples are committed as one KG store version
    record  metrics.jsonl, progress.json (the last completed round), report

The LM side is one Ray Train fit over all rounds (bikd.driver.sides.LMSide), so its worker group and
DeepSpeed engine start once per run; a round is a stretch of its steps, posted to the exchange actor once its
export is complete and its checkpoint committed (a driver never acts on a round a restart could take back).

``async`` mode (the default): both sides run at once, each at its own pace. The KGE side (a driver thread)
runs its rounds back to back (adding whatever has been mined by then, publishing after each); the LM side
runs its rounds back to back without waiting for the driver, polling the exchange every ``exchange.lm_poll_steps`` steps and swapping in the
newest snapshot mid-round; each finished LM round is mined on the newest snapshot while both sides go on.
Staleness (snapshot versions between the newest and the one the LM used) is recorded per round.

``--directions``: ``none`` (each side alone: the LM never sees the KG, nothing is mined), ``kg2lm`` (snapshots
flow to the LM), ``both``. Stopping: ``loop.rounds``, ``loop.time_budget_s``, or a plateau of
``loop.plateau_metric`` (no gain of ``plateau_min_delta`` in ``plateau_patience`` rounds).

Resume: a rerun with the same run_dir continues after the last completed round: the KGE side restores the
checkpoint that round wrote (async: its newest) and re-adds the store's later mined triples, the LM side resumes from its
checkpoint (fusing the snapshot version it recorded; the rounds up to it are posted again from their exports), and a round whose mining commit landed before the
kill is not mined twice. Every file appears atomically (manifest last), so no KG version is lost or doubled.
"""

from bikd.driver.config import BikdConfig, LoopConfig, MineSideConfig, lm_side, required_cpus, validate
from bikd.driver.loop import Driver, precision_at

__all__ = ["LoopConfig", "MineSideConfig", "BikdConfig", "validate", "required_cpus", "lm_side", "Driver", "precision_at"]
