"""Data pipeline: tokenizer, annotation readers, transforms and datasets.

Import the submodules directly (``capvis.data.tokenizer`` etc.); this package imports nothing so that
``capvis --help`` and light tools stay fast.
"""
