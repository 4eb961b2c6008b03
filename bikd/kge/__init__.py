"""KG-embedding models and their training math (pure torch)."""
