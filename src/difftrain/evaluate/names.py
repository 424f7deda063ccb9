"""The metrics' names, light enough for config validation to import (no torch)."""

METRICS = ("fid", "kid", "is", "prc", "clip", "lpips")  # what eval.metrics / --metrics take
# each number a metric gives -> (the metric that computes it, which way is better); keep_best takes these
RESULTS = {"fid": ("fid", "min"), "kid": ("kid", "min"), "is": ("is", "max"), "precision": ("prc", "max"),
           "recall": ("prc", "max"), "clip_score": ("clip", "max"), "lpips_diversity": ("lpips", "max")}
