"""The 1000 ImageNet class names, offline, from the data file shipped in this package."""

from collections import Counter
from functools import cache
from importlib import resources

NUM_IMAGENET_CLASSES = 1000


def _synsets_and_lemmas() -> list[tuple[str, str]]:
    text = resources.files(__package__).joinpath("imagenet_classes.txt").read_text("utf-8")
    rows = [line.split("\t", 1) for line in text.splitlines() if line and not line.startswith("#")]
    if len(rows) != NUM_IMAGENET_CLASSES or any(len(row) != 2 for row in rows):
        raise RuntimeError("imagenet_classes.txt is damaged: reinstall graft")
    return [(synset, lemmas) for synset, lemmas in rows]


def imagenet_labels() -> list[str]:
    """Class names in standard index order (0 = "tench", 281 = "tabby", 967 = "espresso").

    Each name is the first WordNet lemma. Two lemmas name two classes each ("crane" the bird
    and the machine, "maillot"); those get their synset id appended so that every label is
    unique, which label-keyed metrics and label -> index lookups rely on.
    """
    return list(_labels())


@cache
def _labels() -> tuple[str, ...]:
    rows = _synsets_and_lemmas()
    first = [lemmas.split(", ")[0] for _, lemmas in rows]
    shared = {name for name, count in Counter(first).items() if count > 1}
    return tuple(
        f"{name} ({synset})" if name in shared else name
        for name, (synset, _) in zip(first, rows, strict=True)
    )
