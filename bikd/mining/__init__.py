"""LM -> KG mining: candidates from text and the KG model, thresholds calibrated on valid, one round
committed as a KG store version with provenance. Pure (no Ray): ``bikd.ray.mining`` scales the scoring out."""
