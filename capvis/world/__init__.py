"""CaptionWorld: a procedural image-caption dataset that makes VirTex runnable on a CPU in minutes.

Scenes of 1-4 coloured shapes on varied backgrounds (:mod:`.scene`), drawn by :mod:`.render`,
described by five true captions each (:mod:`.grammar`), labelled for downstream tasks (presence,
count, and the fine-grained single-label tasks of :mod:`.fine`), and written as COCO
captions/instances JSON, JPEGs and downstream-label files (:mod:`.export`). Everything is a pure
function of ``(seed, split, index)``.
"""

from __future__ import annotations

from capvis.world.export import label_tasks, write_world
from capvis.world.fine import FINE_TASKS, fine_labels
from capvis.world.grammar import CAPTIONS_PER_IMAGE, captions, relations
from capvis.world.render import render
from capvis.world.scene import Background, Scene, WorldObject, caption_rng, flip_scene, generate_scene
from capvis.world.vocab import COLOR_NAMES, COLORS, SHAPES, SIZES

__all__ = [
    "CAPTIONS_PER_IMAGE", "COLORS", "COLOR_NAMES", "FINE_TASKS", "SHAPES", "SIZES", "Background", "Scene",
    "WorldObject", "caption_rng", "captions", "fine_labels", "flip_scene", "generate_scene", "label_tasks",
    "relations", "render", "write_world",
]
