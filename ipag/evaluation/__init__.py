"""Evaluating the captioner and its explanations over a set of images (`python -m ipag evaluate-…`).

- `captions`: caption quality against references (COCO metrics via pycocoevalcap, CLIP similarity, CLIPScore);
- `bias`: how often a caption names the wrong gender;
- `faithfulness`: deletion / insertion AUC and ROAD per map type, and the grounding's XIC hit rate;
- `inputs`: the image sets and reference files they read; `report`: mean ± std and tables.
"""

from .bias import gender_bias, gender_of, reference_gender
from .captions import MetricUnavailableError, clip_score, clip_text_similarity, coco_metrics, evaluate_captions
from .faithfulness import WordTarget, evaluate_faithfulness, faithfulness_result, image_faithfulness, word_faithfulness
from .inputs import DatasetError, collect_images, match_images, read_references

__all__ = [
    "DatasetError", "MetricUnavailableError", "WordTarget", "clip_score", "clip_text_similarity", "coco_metrics",
    "collect_images", "evaluate_captions", "evaluate_faithfulness", "faithfulness_result", "gender_bias", "gender_of",
    "image_faithfulness", "match_images", "read_references", "reference_gender", "word_faithfulness",
]
