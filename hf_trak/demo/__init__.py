"""``hf-trak demo``: a small ViT trained on scikit-learn's digits with ``TRAKHFTrainer``, attributed and checked by
LDS (``pipeline``), and the digits loader the demo, examples and tests share (``digits``). Needs scikit-learn."""
