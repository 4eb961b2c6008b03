"""bikd: bidirectional knowledge distillation between a knowledge graph and a transformer LM."""

__version__ = "0.1.0"
