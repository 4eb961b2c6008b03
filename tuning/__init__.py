"""Ray Tune sweeps over bikd's fusion hyperparameters; this package alone imports ``ray.tune``."""
