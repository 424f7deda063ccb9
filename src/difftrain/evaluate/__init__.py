"""Measuring models: FID, KID, IS, precision/recall, CLIP score and LPIPS diversity.

    weights.py    where each metric network's weights come from (offline first), loaded safely
    inception.py  torch-fidelity's TF-faithful InceptionV3 -> pool features and logits
    metrics.py    FID, KID, IS, precision/recall from features (torch-fidelity's formulas)
    lpips.py      LPIPS (AlexNet, v0.1) and pairwise diversity
    clip_score.py CLIP score with any transformers CLIP
    reference.py  real-image sets and their features, cached by content; statistics files
    scores.py     every metric of one set of images, networks loaded once (eval and training)
    control.py    agreement of an image with its ControlNet condition (mask IoU, edge F1)
    run.py        `difftrain eval`: draw (through generate's code) or read images, measure, report
    report.py     summary, report.html, metric curves
"""
