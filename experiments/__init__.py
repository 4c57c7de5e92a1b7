"""Research beside the product: the comparison experiments that train and measure, and write result tables.

Run from a checkout of the repository (this folder is not installed with the `asymsearch` wheel)::

    python -m experiments heads  --data DATA ...   # pooling heads on one pretrained backbone, over seeds
    python -m experiments losses --data DATA ...   # one student per AML loss against the same teacher
    python -m experiments addons --data DATA ...   # each training add-on off and on, over seeds

They need nothing beyond the product itself (`pip install -e .` in the checkout: torch, numpy), and use its
public modules only -- `asymsearch.training` (the trainers and their one loop, `training.engine`; the losses, the
add-ons, the feature-map cache), `asymsearch.core` (data, metrics, preprocessing). Nothing installed imports this package
(tests/test_layout.py checks it). Results go to `docs/results/` of the checkout by default (`--out`).
"""
