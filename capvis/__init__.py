"""capvis: learning visual representations from textual annotations (VirTex and its family)."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # ``capvis.load`` is imported on first use, so ``import capvis`` stays free of torch.
    if name == "load":
        from capvis.hub import load

        return load
    raise AttributeError(f"module 'capvis' has no attribute {name!r}")
