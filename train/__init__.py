"""Training, evaluation and data preparation for the RICE encoder: what serving never loads.

Kept apart from `model/` (the library serving loads: backbones, RICE heads, preprocessing, the
checkpoint reader), as open_clip keeps its training package apart; its extra dependencies come with
the `train` extra (`pip install .[train]`), and the serving image carries none of it."""
