"""One fit: the post's loop (``loop.py``), ``fit()`` (``fit.py``), checkpoints."""
