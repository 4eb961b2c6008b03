"""The language-model side: entity linking, KG fusion, distillation losses, tasks (pure torch)."""
