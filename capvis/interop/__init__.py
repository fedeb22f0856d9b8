"""Interoperability: import original VirTex checkpoints; export backbones to torchvision, Detectron2, ONNX.

Each module is a pure mapping over state dicts (plus one ONNX writer) and imports only what it needs,
so ``import capvis.interop`` stays cheap.
"""
