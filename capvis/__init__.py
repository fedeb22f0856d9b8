"""capvis: learning visual representations from textual annotations (VirTex and its family)."""

__version__ = "0.1.0"
