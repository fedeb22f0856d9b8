"""Evaluations of a pretrained backbone and captioner (VirTex paper, Section 4 and Appendix A).

Kept light on purpose: submodules (``svm``, ``voc07``, ``caption_metrics``, ...) are imported
where they are used, so ``import capvis.eval`` pulls in neither scikit-learn nor torch.
"""

from __future__ import annotations
