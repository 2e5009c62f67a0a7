"""``make demo`` (``python -m demo``): the whole job on CPU in a few minutes, beside the library, not in it."""
