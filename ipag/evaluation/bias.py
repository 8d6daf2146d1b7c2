"""Gender bias of the captions: how often the caption names the other gender than the people who described the
image (the "misclassification rate" of the captioning systems this project absorbs; Hendricks et al., "Women
also snowboard", ECCV 2018, measure the same error).

An image counts when a majority of its references that mention one gender only mention the same one. Its
caption is then correct, wrong (the other gender), neutral (no gendered word: "a person", "a child") or mixed
(both genders: "a man and a woman"). All four rates share that denominator, so they add up to 1: a model
cannot look unbiased merely by saying "person" everywhere without that showing in the neutral rate.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

Gender = Literal["male", "female", "neutral", "mixed"]

MALE_WORDS = frozenset(
    "man men boy boys male males he him his himself gentleman gentlemen guy guys father fathers dad son sons "
    "husband husbands brother brothers boyfriend grandfather uncle king".split())
FEMALE_WORDS = frozenset(
    "woman women girl girls female females she her hers herself lady ladies gal gals mother mothers mom daughter "
    "daughters wife wives sister sisters girlfriend grandmother aunt queen".split())

#: Words are runs of letters, so a possessive ("man's") yields the word itself.
_WORD = re.compile(r"[a-z]+")


def gender_of(text: str) -> Gender:
    """Which genders a text mentions, by whole words (case-insensitive): "woman" is not read as "man"."""
    words = set(_WORD.findall(text.lower()))
    male, female = bool(words & MALE_WORDS), bool(words & FEMALE_WORDS)
    return "mixed" if male and female else "male" if male else "female" if female else "neutral"


def reference_gender(references: Sequence[str]) -> Literal["male", "female"] | None:
    """The gender a strict majority of the single-gender references mention; None without one."""
    votes = [gender_of(reference) for reference in references]
    male, female = votes.count("male"), votes.count("female")
    return "male" if male > female else "female" if female > male else None


def gender_bias(captions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """Counts and rates over the images of `captions` whose references have a majority gender (see module)."""
    outcomes: dict[str, list[str]] = {"correct": [], "wrong": [], "neutral": [], "mixed": []}
    wrong_by_truth = {"male": 0, "female": 0}
    for image, caption in captions.items():
        truth = reference_gender(references[image])
        if truth is None:
            continue
        said = gender_of(caption)
        outcome = "correct" if said == truth else said if said in ("neutral", "mixed") else "wrong"
        outcomes[outcome].append(image)
        if outcome == "wrong":
            wrong_by_truth[truth] += 1
    evaluated = sum(len(images) for images in outcomes.values())

    def rate(count: int) -> float | None:
        return count / evaluated if evaluated else None

    return {
        "images_with_reference_gender": evaluated,
        **{outcome: len(images) for outcome, images in outcomes.items()},
        "misclassification_rate": rate(len(outcomes["wrong"])),
        "neutral_rate": rate(len(outcomes["neutral"])),
        "mixed_rate": rate(len(outcomes["mixed"])),
        "male_called_female": wrong_by_truth["male"],
        "female_called_male": wrong_by_truth["female"],
        "misclassified_images": outcomes["wrong"],
    }
