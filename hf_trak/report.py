"""Visual reports of an attribution's top-k dataset (``Attribution.top_k`` or ``hf-trak top-k``) and of a
self-influence ranking (``hf_trak.self_influence.self_influence_dataset`` or ``hf-trak self-influence``).

Image tasks: a PNG grid, one row per target: the target, its top proponents (green, largest
scores) and top opponents (red, smallest scores), each captioned with its label and score.
Text tasks: an HTML page, one section per target, with the same two lists. The columns are
those of ``hf_trak.attribute.top_k_dataset``: ``target``, ``kind``, ``rank``, ``train_index``,
``score``, the train example's raw columns and the target's, prefixed ``target_``.
Self-influence: the same two forms, one cell (or table row) per train example, highest first, with its
label, the model's prediction, its loss and its score (and its tokens shaded by their shares, if split).
"""

import os
from typing import List, Optional

import jinja2
import numpy as np
from datasets import ClassLabel, Dataset, Image
from PIL import Image as PILImage
from PIL import ImageDraw, ImageFont

from hf_trak.data.processing import LABEL_COLUMNS, is_text
from hf_trak.errors import InvalidArgumentError
from hf_trak.store.files import atomic_write, write_text

META_COLUMNS = (
    "target",
    "kind",
    "rank",
    "train_index",
    "score",
    "loss",
    "prediction",
    "train_tokens",
    "train_token_scores",
    "train_pooled",
)
CELL, CAPTION, GAP, LINE = 96, 43, 12, 16
PROPONENT, OPPONENT, TARGET = (34, 139, 34), (200, 40, 40), (60, 60, 60)

SHADE_MACRO = """{% macro shade(tokens) %}{% for token, color in tokens %}<span class="token" title="{{ color[1] }}"
style="background: {{ color[0] }}">{{ token }}</span>{% endfor %}{% endmacro %}"""
HTML_TEMPLATE = (
    SHADE_MACRO
    + """<!doctype html>
<html><head><meta charset="utf-8"><title>TRAK attributions</title>
<style>
body { font-family: sans-serif; margin: 2em; max-width: 72em; }
section { border-top: 1px solid #ccc; padding: 0.5em 0; }
.target { background: #f4f4f4; padding: 0.5em; }
.columns { display: flex; gap: 2em; }
.columns > div { flex: 1; }
.proponent { color: #228b22; } .opponent { color: #c82828; }
td { vertical-align: top; padding: 0.2em 0.5em; } td.score { font-family: monospace; white-space: nowrap; }
.token { padding: 0 0.1em; margin: 0 0.05em; border-radius: 2px; }
</style></head><body>
<h1>TRAK attributions</h1>
<p>For each target: the training examples with the largest scores (proponents: training on them
raised the model's output on the target) and the smallest (opponents: they lowered it).</p>
{% for target in targets %}
<section>
<h2>Target {{ target.index }}{% if target.label is not none %} (label: {{ target.label }}){% endif %}</h2>
<div class="target">{% if target.tokens %}{{ shade(target.tokens) }}<br><small>shaded: the target's tokens the top
proponents reach (green: raised, red: lowered)</small>{% else %}{{ target.text }}{% endif %}</div>
<div class="columns">
{% for kind, rows in (("proponent", target.proponents), ("opponent", target.opponents)) %}
<div><h3 class="{{ kind }}">Top {{ kind }}s</h3><table>
{% for row in rows %}<tr><td class="score {{ kind }}">{{ "%+.4f"|format(row.score) }}</td>
<td>#{{ row.train_index }}{% if row.label is not none %} · {{ row.label }}{% endif %}</td>
<td>{% if row.tokens %}{{ shade(row.tokens) }}{% else %}{{ row.text }}{% endif %}</td></tr>{% endfor %}
</table></div>
{% endfor %}
</div></section>
{% endfor %}
</body></html>
"""
)


def _shown_columns(top_k: Dataset) -> List[str]:
    return [name for name in top_k.column_names if name not in META_COLUMNS and not name.startswith("target_")]


def _label_column(top_k: Dataset) -> Optional[str]:
    return next((name for name in LABEL_COLUMNS if name in top_k.column_names), None)


def image_column(top_k: Dataset) -> Optional[str]:
    """The column showing each train example as an image: an ``Image`` feature, else ``pixel_values``."""
    shown = _shown_columns(top_k)
    images = [name for name in shown if isinstance(top_k.features[name], Image)]
    return images[0] if images else ("pixel_values" if "pixel_values" in shown else None)


def text_column(top_k: Dataset) -> Optional[str]:
    """The first string column of the train examples."""
    return next((name for name in _shown_columns(top_k) if is_text(top_k.features[name])), None)


def _label_text(top_k: Dataset, column: Optional[str], value) -> Optional[str]:
    if column is None or value is None:
        return None
    feature = top_k.features[column]
    return feature.int2str(int(value)) if isinstance(feature, ClassLabel) and value >= 0 else str(value)


def _caption(top_k: Dataset, row: dict, prefix: str, text: Optional[str], label: Optional[str]) -> str:
    """The example's text if the examples have one, else ``label <name>`` (``prefix``: "" or "target_")."""
    if text is not None:
        return str(row[prefix + text])
    return "" if label is None else f"label {_label_text(top_k, prefix + label, row[prefix + label])}"


def to_pil(value) -> PILImage.Image:
    """A PIL image of a PIL image or an array ((H, W), (C, H, W) or (H, W, C), any range)."""
    if isinstance(value, PILImage.Image):
        return value.convert("RGB")
    array = np.asarray(value, dtype=np.float64)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = array.transpose(1, 2, 0)
    array = array.squeeze(-1) if array.ndim == 3 and array.shape[-1] == 1 else array
    low, high = array.min(), array.max()
    scaled = np.zeros_like(array) if high == low else (array - low) / (high - low)
    return PILImage.fromarray((scaled * 255).round().astype(np.uint8)).convert("RGB")


def _cell(image: PILImage.Image, lines: List[str], color, font) -> PILImage.Image:
    cell = PILImage.new("RGB", (CELL, CELL + CAPTION), "white")
    resample = PILImage.NEAREST if max(image.size) < CELL // 2 else PILImage.BILINEAR
    image = image.copy()
    image = image.resize((CELL - 6, CELL - 6), resample) if max(image.size) < CELL else image
    image.thumbnail((CELL - 6, CELL - 6))
    cell.paste(color, (0, 0, CELL, CELL))
    cell.paste(image, ((CELL - image.width) // 2, (CELL - image.height) // 2))
    draw = ImageDraw.Draw(cell)
    first, rest = lines[0], " ".join(lines[1:])
    wrapped = [first[:LINE], rest[:LINE], rest[LINE : 2 * LINE]]
    for number, line in enumerate(wrapped):
        draw.text((3, CELL + 2 + 13 * number), line, fill="black", font=font)
    return cell


def _targets(top_k: Dataset, num_targets: int, k: Optional[int]) -> List[dict]:
    """Per target (first ``num_targets``): its first row (``first``, which shows the target) and the
    indices of its proponent and opponent rows (``k`` of each)."""
    columns = top_k.select_columns(["target", "kind", "rank"]).to_pandas()
    chosen = sorted(columns["target"].unique())[:num_targets]
    groups = []
    for target in chosen:
        rows = columns[(columns["target"] == target) & ((columns["rank"] < k) if k else True)]
        proponents = rows[rows["kind"] == "proponent"].sort_values("rank").index.tolist()
        opponents = rows[rows["kind"] == "opponent"].sort_values("rank").index.tolist()
        first = top_k[(proponents or opponents)[0]]
        groups.append({"target": int(target), "first": first, "proponents": proponents, "opponents": opponents})
    return groups


def write_image_report(top_k: Dataset, path: str, num_targets: int = 8, k: Optional[int] = None) -> str:
    """PNG grid: per target row, the target, its proponents and its opponents, captioned label/score."""
    column, label, text = image_column(top_k), _label_column(top_k), text_column(top_k)
    if column is None:
        raise InvalidArgumentError("The attributed examples have no image column: write an .html report instead.")
    groups = _targets(top_k, num_targets, k)
    width = max(len(group["proponents"]) for group in groups)
    font = ImageFont.load_default()
    grid = PILImage.new("RGB", (CELL * (1 + 2 * width) + 2 * GAP, 20 + len(groups) * (CELL + CAPTION + GAP)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((4, 4), "target", fill=TARGET, font=font)
    draw.text((CELL + GAP + 4, 4), "top proponents (largest scores)", fill=PROPONENT, font=font)
    opponents_at = CELL * (1 + width) + 2 * GAP
    draw.text((opponents_at + 4, 4), "top opponents (smallest scores)", fill=OPPONENT, font=font)
    for number, group in enumerate(groups):
        top = 20 + number * (CELL + CAPTION + GAP)
        first = group["first"]
        caption = [f"target {group['target']}", _caption(top_k, first, "target_", text, label)]
        grid.paste(_cell(to_pil(first[f"target_{column}"]), caption, TARGET, font), (0, top))
        for kind, offset, color in (("proponents", CELL + GAP, PROPONENT), ("opponents", opponents_at, OPPONENT)):
            for slot, row_index in enumerate(group[kind]):
                row = top_k[int(row_index)]
                lines = [f"{row['score']:+.4f} #{row['train_index']}", _caption(top_k, row, "", text, label)]
                grid.paste(_cell(to_pil(row[column]), lines, color, font), (offset + slot * CELL, top))
    return atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))


def shaded(tokens: List[str], shares: List[float]) -> List[tuple]:
    """``(token, (css background, share as text))`` per token: green for a positive share, red for a negative one,
    as opaque as the share's size relative to the largest of the example's."""
    largest = max((abs(share) for share in shares), default=0.0) or 1.0
    colors = []
    for share in shares:
        red, green, blue = PROPONENT if share >= 0 else OPPONENT
        colors.append((f"rgba({red}, {green}, {blue}, {0.75 * abs(share) / largest:.3f})", f"{share:+.4g}"))
    return list(zip(tokens, colors))


def write_text_report(top_k: Dataset, path: str, num_targets: int = 8, k: Optional[int] = None) -> str:
    """HTML page: per target, its text and label, and its proponents and opponents with scores; with token
    scores (``hf_trak.attribute.with_token_scores``), each example's tokens shaded by their shares and the
    target's by the sum of its proponents' shares."""
    text, label = text_column(top_k), _label_column(top_k)
    if text is None and "train_tokens" not in top_k.column_names:
        raise InvalidArgumentError("The attributed examples have no text column: write a .png report instead.")
    tokens = "train_tokens" in top_k.column_names

    def shown(row):
        return {
            "score": row["score"],
            "train_index": row["train_index"],
            "text": row[text] if text is not None else "",
            "label": _label_text(top_k, label, row.get(label)),
            "tokens": shaded(row["train_tokens"], row["train_token_scores"]) if tokens else None,
        }

    targets = []
    for group in _targets(top_k, num_targets, k):
        first = group["first"]
        reached = None
        if tokens and group["proponents"]:
            rows = [top_k[int(i)] for i in group["proponents"]]
            reached = shaded(
                rows[0]["target_tokens"], np.sum([r["target_token_scores"] for r in rows], axis=0).tolist()
            )
        targets.append(
            {
                "index": group["target"],
                "text": first[f"target_{text}"] if text is not None else "",
                "label": _label_text(top_k, label, first.get(f"target_{label}")),
                "tokens": reached,
                "proponents": [shown(top_k[int(i)]) for i in group["proponents"]],
                "opponents": [shown(top_k[int(i)]) for i in group["opponents"]],
            }
        )
    page = jinja2.Environment(autoescape=True).from_string(HTML_TEMPLATE).render(targets=targets)
    return write_text(path, page)


SELF_INFLUENCE_TEMPLATE = (
    SHADE_MACRO
    + """<!doctype html>
<html><head><meta charset="utf-8"><title>Self-influence</title>
<style>
body { font-family: sans-serif; margin: 2em; max-width: 72em; }
td, th { vertical-align: top; padding: 0.2em 0.5em; text-align: left; }
td.number { font-family: monospace; white-space: nowrap; } .differs { color: #c82828; font-weight: bold; }
.token { padding: 0 0.1em; margin: 0 0.05em; border-radius: 2px; }
</style></head><body>
<h1>Self-influence</h1>
<p>The most suspect training examples: ranked by the mean of their ranks by self-influence on their own
output and on their own loss (suspicion, 1 = the most suspect). The score is the self-influence on the
loss: how much training on the example moves the model's loss on that same example. Mislabeled rows,
outliers and rare cases rank first; a prediction that differs from the label is in red.</p>
<table><tr><th>rank</th><th>row</th><th>suspicion</th><th>score</th><th>loss</th>{% if labels %}<th>label</th>
<th>prediction</th>{% endif %}<th>example</th></tr>
{% for row in rows %}<tr><td class="number">{{ row.rank + 1 }}</td><td class="number">#{{ row.train_index }}</td>
<td class="number">{{ "%.3f"|format(row.suspicion) }}</td><td class="number">{{ "%+.4f"|format(row.score) }}</td>
<td class="number">{{ "%.3f"|format(row.loss) }}</td>
{% if labels %}<td>{{ row.label }}</td><td{% if row.differs %} class="differs"{% endif %}>{{ row.prediction }}</td>
{% endif %}<td>{% if row.tokens %}{{ shade(row.tokens) }}{% else %}{{ row.text }}{% endif %}</td></tr>{% endfor %}
</table></body></html>
"""
)
SELF_INFLUENCE_COLUMNS = 10  # cells per row of the PNG grid


def _self_influence_rows(ranking: Dataset, k: Optional[int]) -> List[dict]:
    """The first ``k`` rows of a self-influence dataset, with ``label`` and ``prediction`` as names."""
    label = _label_column(ranking)
    rows = []
    for row in ranking.select(range(min(k or len(ranking), len(ranking)))):
        shown = dict(row, label=_label_text(ranking, label, row.get(label)))
        prediction = row.get("prediction")
        shown["prediction"] = None if prediction is None else _label_text(ranking, "prediction", prediction)
        shown["differs"] = prediction is not None and label is not None and prediction != row.get(label)
        shown["tokens"] = shaded(row["tokens"], row["token_scores"]) if "tokens" in row else None
        rows.append(shown)
    return rows


def write_self_influence_report(ranking: Dataset, path: str, k: Optional[int] = None) -> str:
    """A ``.png`` grid (image examples: captioned ``#row score`` and ``label → prediction``) or an ``.html`` table
    (any examples) of a self-influence ranking, chosen by ``path``'s suffix."""
    rows = _self_influence_rows(ranking, k)
    if check_report_path(path) == "html":
        text = text_column(ranking)
        for row in rows:
            row["text"] = row[text] if text is not None else ""
        page = jinja2.Environment(autoescape=True).from_string(SELF_INFLUENCE_TEMPLATE)
        return write_text(path, page.render(rows=rows, labels=_label_column(ranking) is not None))
    column = image_column(ranking)
    if column is None:
        raise InvalidArgumentError("The examples have no image column: write an .html report instead.")
    font, width = ImageFont.load_default(), min(SELF_INFLUENCE_COLUMNS, len(rows))
    lines = -(-len(rows) // SELF_INFLUENCE_COLUMNS)
    grid = PILImage.new("RGB", (CELL * max(width, 1), 20 + lines * (CELL + CAPTION)), "white")
    title = "most suspect first (red: predicted otherwise)"
    ImageDraw.Draw(grid).text((4, 4), title, fill=TARGET, font=font)
    for number, row in enumerate(rows):
        caption = [f"{row['score']:+.4f} #{row['train_index']}"]
        if row["label"] is not None:
            caption.append(f"{row['label']} -> {row['prediction']}" if row["prediction"] is not None else row["label"])
        color = OPPONENT if row["differs"] else TARGET
        place = (CELL * (number % SELF_INFLUENCE_COLUMNS), 20 + (number // SELF_INFLUENCE_COLUMNS) * (CELL + CAPTION))
        grid.paste(_cell(to_pil(row[column]), caption, color, font), place)
    return atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))


def check_report_path(path: str) -> str:
    """The report kind ``path``'s suffix names: "png" or "html" (else ``InvalidArgumentError``)."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in (".png", ".html", ".htm"):
        raise InvalidArgumentError(f"Report path {path!r} must end in .png (images) or .html (text).")
    return "png" if suffix == ".png" else "html"


def write_report(top_k: Dataset, path: str, num_targets: int = 8, k: Optional[int] = None) -> str:
    """A ``.png`` grid (image examples) or ``.html`` page (text examples), chosen by ``path``'s suffix."""
    if check_report_path(path) == "png":
        return write_image_report(top_k, path, num_targets, k)
    return write_text_report(top_k, path, num_targets, k)
