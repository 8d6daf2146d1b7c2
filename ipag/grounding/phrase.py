"""The phrase a caption word is grounded in: its noun phrase ("red circle" for "red" and for "circle").

CLIP is asked where "a photo of red" is, and a colour alone matches every patch of it; asked for the noun phrase
the word belongs to ("brown dog" for "dog" in "a brown dog on the grass"), it is asked for the object the
caption means. A tagger would find the phrases best, but the well-kept chunkers need models that are not on
PyPI (spaCy's pipelines and NLTK's tagger data are downloaded from elsewhere at run time; the PyPI copies of them
are unofficial re-uploads), and this package must run offline. Captions are short and regular, so a small rule
does it:

**A phrase is a maximal run of content words not interrupted by punctuation.** Function words (`FUNCTION_WORDS`:
articles, determiners, pronouns, prepositions, conjunctions, auxiliaries) and punctuation end a phrase, and so do
verbs, which captions write as present participles ("a man *riding* a horse", "a cat *sitting* on a couch"):
a word ending in "-ing" is taken for a verb unless it is a common "-ing" noun (`ING_NOUNS`: "building",
"ceiling", …) or directly follows a determiner ("a painting"). Numbers and adjectives stay in the phrase ("two
brown dogs"). A function word or verb is grounded as itself.

What the rule gets wrong: noun-noun boundaries without a function word between them ("a dog cat" is one phrase),
verbs that are not participles ("a man rides a horse" gives "man rides"), listed "-ing" nouns used as verbs ("a
man painting a wall" gives "man painting"), and unlisted "-ing" nouns after an adjective ("a thick coating"
gives "thick" and "coating" apart).
"""

from __future__ import annotations

from collections.abc import Sequence

DETERMINERS = frozenset(
    "a an the this that these those some any each every no another its his her their my your our".split())
#: Words that end a phrase: determiners, pronouns, prepositions, conjunctions, auxiliaries and copulas.
FUNCTION_WORDS = DETERMINERS | frozenset("""
    i you he she it we they him them me us there here what which who whom whose
    of in on at by for with without from to into onto over under above below behind beside besides between near
    next across along around against through inside outside top front up down off out about among beneath upon
    while during after before than like as
    and or but nor so yet either neither both
    is are was were be been being am has have had do does did can could will would may might must shall should
""".split())
#: Common nouns that end in "-ing" (not verbs): they stay in their phrase wherever they stand.
ING_NOUNS = frozenset("""
    building buildings ceiling ceilings clothing king kings ring rings thing things string strings swing swings
    wing wings wedding weddings evening morning spring sibling siblings pudding icing railing railings awning
    bedding parking frosting stuffing topping toppings dressing painting paintings drawing drawings
""".split())


def noun_phrase(text: str, spans: Sequence[tuple[int, int]], index: int) -> str:
    """The phrase of word `index` of `text`, whose words are at the character `spans` (start, end), in order.

    The phrase is `text` from its first word's start to its last word's end (so what stands between its words,
    a hyphen say, is kept as written). See the module docstring for the rule.
    """
    if not 0 <= index < len(spans):
        raise IndexError(f"Word {index} does not exist: the text has {len(spans)} words.")
    words = [text[start:end].lower() for start, end in spans]
    content = [_is_content(words, i) for i in range(len(words))]
    if not content[index]:
        return text[slice(*spans[index])]
    first = last = index
    while first > 0 and content[first - 1] and _joined(text, spans, first - 1):
        first -= 1
    while last + 1 < len(words) and content[last + 1] and _joined(text, spans, last):
        last += 1
    return text[spans[first][0]:spans[last][1]]


def _is_content(words: Sequence[str], index: int) -> bool:
    """Whether word `index` can be part of a noun phrase (not a function word, not a verb)."""
    word = words[index]
    if word in FUNCTION_WORDS:
        return False
    if word.endswith("ing") and len(word) > 4 and word not in ING_NOUNS:
        return index > 0 and words[index - 1] in DETERMINERS  # "a painting", "the setting sun"
    return True


def _joined(text: str, spans: Sequence[tuple[int, int]], index: int) -> bool:
    """Whether words `index` and `index + 1` are separated by spaces only (or nothing, or a hyphen):
    punctuation between them ends a phrase."""
    between = text[spans[index][1]:spans[index + 1][0]]
    return between.strip() in ("", "-")
