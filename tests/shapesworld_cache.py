"""The small ShapesWorld the `vlp train` smoke tests train on; tests/smoke/conftest.py generates
it once per session (fixture `shapesworld_cache`)."""

SYNTH = {"num_train": 1200, "num_eval": 96, "seed": 0, "image_size": 64,
         "samples_per_shard": 300}
"""ShapesWorld's parameters, as `data.synth.*` overrides of recipes/shapesworld-tiny.yaml."""
