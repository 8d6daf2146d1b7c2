"""Generated scenes with known evidence, and the small models trained on them.

`generate_scene(seed)` gives a `Scene` (`.image`, `.caption`, `.evidence`: per caption word its object's mask or
None); `Explainer.synthetic()` loads the models shipped in `models/`, which `python -m ipag train-synthetic`
retrains; `python -m ipag evaluate-groundtruth` (`ipag.evaluation.groundtruth`) scores every map and the
grounding against the evidence (see models/README.md and docs/evaluation.md).
"""

from .scenes import Scene, SceneObject, generate_scene

__all__ = ["Scene", "SceneObject", "generate_scene"]
