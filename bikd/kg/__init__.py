"""The KG data layer: triples, id maps, text, datasets and the versioned store (pure Python/torch)."""
