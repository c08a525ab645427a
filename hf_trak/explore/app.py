"""``hf_trak.explore`` / ``hf-trak explore``: browse a target's proponents and opponents in a Gradio app.

    hf_trak.explore("imdb-trak", train_dataset=load_dataset("imdb", split="train"), model="me/imdb-bert")

Pick a target (a row of the target split, or a new text / image / both for CLIP), see the
model's prediction, its top-k proponents and opponents (text or image, label, score, train
row) and, with several checkpoints, how far each checkpoint's own top-k agrees with the
ensemble's. Clicking a training example makes it the next target. Apart from the target's
results, "Self-influence" lists the most suspect training examples by self-influence (likely
mislabeled, outlying or rare); clicking one makes it the target too. The same app runs as a
Hugging Face Space (``examples/space/app.py``).

Queries go through ``hf_trak.explore.explorer.Explorer``. Every failure, at start (a store that
does not match the model or split) or in a query (empty text, a wrong image), is shown as a
message in the page; the server keeps running. Needs ``pip install 'hf_trak[app]'``.
"""

import functools
import inspect
import logging
import sys
from typing import Any, Optional

import numpy as np

from hf_trak.attribute import token_names
from hf_trak.errors import InvalidArgumentError, InvalidInputError, MissingDependencyError
from hf_trak.explore.explorer import Explorer
from hf_trak.explore.images import ImageFiles, enlarged
from hf_trak.explore.results import Query
from hf_trak.report import SHADE_MACRO, shaded

logger = logging.getLogger(__name__)

PREDICTED = "the prediction"
MARKDOWN_SPECIAL = set("\\`*_[]<>#|")
TEXT_PREVIEW = 200  # characters of a train example's text shown in the tables
MAX_UPLOAD_MB = 10  # uploads over this size are refused by the server, with a message in the page
# A thumbnail of the results is a button (its example becomes the target), not a choice that stays: Gradio keeps
# the clicked position "selected" across new results, so the selected look is the plain one.
GALLERY_CSS = """
#proponents .thumbnail-item.selected, #opponents .thumbnail-item.selected, #self-influence .thumbnail-item.selected {
    --ring-color: transparent; border-color: var(--border-color-primary);
}
"""


@functools.lru_cache(maxsize=None)
def _css_at_launch() -> bool:
    """Whether Gradio takes the page's css at ``launch`` (Gradio 6) rather than in ``Blocks`` (Gradio 5)."""
    return "css" in inspect.signature(require_gradio().Blocks.launch).parameters


def require_gradio():
    try:
        import gradio
    except ImportError as error:
        raise MissingDependencyError("hf_trak's explorer needs Gradio: pip install 'hf_trak[app]'.") from error
    return gradio


def _message(error: Exception) -> str:
    """One line for the page: the error's own text, never a traceback."""
    text = " ".join(str(error).split()) or type(error).__name__
    return "**Error:** " + "".join("\\" + c if c in MARKDOWN_SPECIAL else c for c in text)


class UnreadableUpload:
    """What an upload that Gradio could not read as an image becomes, for the handler to refuse in the page."""

    def __init__(self, error: Exception):
        self.error = " ".join(str(error).split())[:200]


def _readable(preprocess):
    """Gradio's image ``preprocess``, an unreadable file turned into an ``UnreadableUpload`` instead of an error of
    every output with a traceback in the log."""

    def wrapped(payload):
        try:
            return preprocess(payload)
        except Exception as error:  # PIL's UnidentifiedImageError, a truncated file...
            return UnreadableUpload(error)

    return wrapped


class ExplorerApp:
    """The Gradio Blocks of an ``Explorer`` (``blocks``), or of the message of why there is none."""

    def __init__(self, explorer: Optional[Explorer], error: Optional[str] = None, title: str = "hf_trak explorer"):
        self.gr = require_gradio()
        self.explorer = explorer
        styled = {} if _css_at_launch() else {"css": GALLERY_CSS}  # Gradio 6 takes it at launch (``serve``)
        with self.gr.Blocks(title=title, analytics_enabled=False, **styled) as self.blocks:
            self.gr.Markdown(f"# {title}")
            if explorer is None:
                self.gr.Markdown(_message(Exception(error)), elem_id="message")
            else:
                self._build()

    # ------------------------------------------------------------------ layout
    def _build(self) -> None:
        gr, explorer = self.gr, self.explorer
        store = explorer.store.config
        self.images = ImageFiles()  # the images shown, as files written once (see ``hf_trak.explore.images``)
        gr.Markdown(
            f"{store.num_train_examples} training examples · {store.num_checkpoints} checkpoint(s) · "
            f"{type(explorer.model).__name__} · {store.projector} projection, k = {store.feature_dim} · "
            f"{explorer.index.description if explorer.index else 'exact scores from the store'}"
        )
        with gr.Row():
            with gr.Column(scale=1):
                self.texts = [gr.Textbox(label=name, lines=3, elem_id=f"text-{i}") for i, name in
                              enumerate(explorer.text_columns)]  # fmt: skip
                self.image = None
                if explorer.image_column is not None:
                    self.image = gr.Image(label=explorer.image_column, type="pil", elem_id="image", height=200)
                    self.image.preprocess = _readable(self.image.preprocess)  # a file that is no image: a message
                self.label = None
                if explorer.label_column is not None:
                    choices = [PREDICTED] + explorer.label_names
                    self.label = gr.Dropdown(choices, value=PREDICTED, label="Attribute the label", elem_id="label")
                attribute = gr.Button("Attribute", variant="primary", elem_id="attribute")
                self.row = None
                if explorer.targets is not None:
                    self.row = gr.Number(0, label=f"Target row (0–{len(explorer.targets) - 1})", precision=None,
                                         elem_id="target-row")  # fmt: skip
                    pick = gr.Button("Attribute this target row", elem_id="pick")
            with gr.Column(scale=2):
                self.message = gr.Markdown("", elem_id="message")
                self.target_view = None
                if explorer.image_column is not None:  # the target, enlarged (the input shows it at its size)
                    self.target_view = gr.Image(label="Target", interactive=False, height=160, elem_id="target-view")
                self.summary = gr.Markdown("Enter a target and press Attribute.", elem_id="summary")
                self.proponents = self._results("Proponents (largest scores): click one to make it the target",
                                                "proponents")  # fmt: skip
                self.opponents = self._results("Opponents (smallest scores): click one to make it the target",
                                               "opponents")  # fmt: skip
                self.tokens = None
                if explorer.has_token_scores:
                    with gr.Accordion("Tokens: which tokens carry the proponents' scores", open=False):
                        show_tokens = gr.Button("Split the proponents' scores by token", elem_id="show-tokens")
                        self.tokens = gr.HTML("", elem_id="tokens")
                with gr.Accordion("Self-influence: likely mislabeled, outlying or rare training examples", open=False):
                    show_ranking = gr.Button("List the most suspect", elem_id="show-self-influence")
                    self.ranking = self._results("Most suspect first: click one to make it the target",
                                                 "self-influence")  # fmt: skip
        self.shown = gr.State(([], []))  # train rows of the proponents and opponents on the page
        self.ranked = gr.State([])  # train rows of the self-influence list
        self.last = gr.State(None)  # (the target on the page, its attributed label)

        outputs = self._outputs()
        inputs = self.texts + [c for c in (self.image, self.label) if c is not None]
        # A click while a query runs is answered after it (always_last), not dropped.
        attribute.click(self.on_attribute, inputs, outputs, trigger_mode="always_last")
        if self.row is not None:
            pick.click(self.on_target_row, [self.row], outputs, trigger_mode="always_last")

        def select_proponent(shown, evt: gr.SelectData):
            return self.on_select(shown, evt, 0)

        def select_opponent(shown, evt: gr.SelectData):
            return self.on_select(shown, evt, 1)

        self.proponents.select(select_proponent, [self.shown], outputs, trigger_mode="always_last")
        self.opponents.select(select_opponent, [self.shown], outputs, trigger_mode="always_last")
        if self.tokens is not None:
            show_tokens.click(self.on_tokens, [self.last, self.shown], [self.message, self.tokens],
                              trigger_mode="always_last")  # fmt: skip
        show_ranking.click(self.on_self_influence, [], [self.message, self.ranking, self.ranked],
                           trigger_mode="always_last")  # fmt: skip

        def select_ranked(ranked, evt: gr.SelectData):
            return self.on_select((ranked,), evt, 0)

        self.ranking.select(select_ranked, [self.ranked], outputs, trigger_mode="always_last")

    def _results(self, label: str, kind: str):
        """The list of train rows ``kind`` (its element id): a gallery of images, else a table."""
        gr = self.gr
        if self.explorer.image_column is not None:
            return gr.Gallery(label=label, columns=5, height="auto", allow_preview=False, elem_id=kind, format="png")
        label_header = ["label"] if self.explorer.label_column else []
        headers = ["rank", "train row", "score"] + label_header + self.explorer.text_columns
        return gr.Dataframe(headers=headers, label=label, interactive=False, elem_id=kind, wrap=True)

    def _outputs(self) -> list:
        widgets = self.texts + [c for c in (self.image, self.label, self.target_view, self.row) if c is not None]
        shown = [self.message, self.summary, self.proponents, self.opponents, self.shown, self.last]
        return shown + ([self.tokens] if self.tokens is not None else []) + widgets

    # ------------------------------------------------------------------ events
    def on_attribute(self, *values):
        """The inputs' target (new text / image), for the chosen label."""
        texts = list(values[: len(self.texts)])
        rest = list(values[len(self.texts) :])
        image = rest.pop(0) if self.image is not None else None
        label = rest.pop(0) if self.label is not None else None
        try:
            if isinstance(image, UnreadableUpload):
                raise InvalidInputError(f"The uploaded file is not an image this app can read ({image.error}).")
            example = self.explorer.new_example(texts or None, image)
            chosen = None if label in (None, PREDICTED) else self.explorer.label_names.index(label)
            why = "the model's prediction" if chosen is None else "picked in the page"
            return self._show(self.explorer.query(example, label=chosen), "a new input", why, fill=False)
        except Exception as error:  # shown in the page; the server keeps running
            logger.warning("Query failed: %s", error)
            return self._failed(error)

    def on_target_row(self, row):
        try:
            if row is None or float(row) != int(float(row)):
                raise InvalidInputError(f"The target row must be a whole number, got {row}.")
            row = int(float(row))
            query = self.explorer.query(self.explorer.target_example(row))
            return self._show(query, f"target row {row}", "its own", row=row)
        except Exception as error:
            logger.warning("Query failed: %s", error)
            return self._failed(error)

    def on_tokens(self, last, shown):
        """The page's target and proponents, each proponent's tokens shaded by their share of its score and the
        target's by the proponents' summed shares (``Explorer.token_scores``)."""
        try:
            if not last or not shown[0]:
                raise InvalidInputError("Attribute a target first.")
            example, label = last
            return "", token_view(self.explorer, self.explorer.token_scores(example, label, list(shown[0])))
        except Exception as error:
            logger.warning("Token scores failed: %s", error)
            return _message(error), self.gr.update()

    def on_self_influence(self):
        """The self-influence list (it does not depend on the target: the target's results stay as they are)."""
        try:
            ranked = self.explorer.self_influence()
            return "", self._render(ranked), [n.row for n in ranked]
        except Exception as error:
            logger.warning("Self-influence failed: %s", error)
            return _message(error), self.gr.update(), self.gr.update()

    def on_select(self, shown, evt, which: int):
        """A clicked proponent (``which`` 0 of ``shown``), opponent (1) or self-influence row (0 of ``(ranked,)``)
        becomes the target, with its own label."""
        try:
            position = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
            row = shown[which][int(position)]
            return self._show(self.explorer.query(self.explorer.train_example(row)), f"train row {row}", "its own")
        except Exception as error:
            logger.warning("Query failed: %s", error)
            return self._failed(error)

    # ------------------------------------------------------------------ rendering
    def _failed(self, error: Exception) -> list:
        return [_message(error)] + [self.gr.update() for _ in self._outputs()[1:]]

    def _show(self, query: Query, what: str, why: str, fill: bool = True, row: Optional[int] = None) -> list:
        """The page for ``query``: ``what`` the target is, ``why`` its label is the one attributed. A row's own
        label is attributed for a row; the label field goes back to the prediction, so that a new input typed
        afterwards is attributed for its prediction unless another label is picked for it. ``row``: the target
        split's row, shown in the row field (empty for other targets)."""
        explorer = self.explorer
        lines = [f"**Target:** {what} · **prediction:** {query.prediction}"]
        if query.label is not None:
            lines[0] += f" · **attributed label:** {explorer.label_name(query.label)} ({why})"
        if query.proponents:
            top = query.proponents[0]
            lines.append(f"**Top proponent:** train row {top.row} (score {top.score:.4g})")
        if query.agreement:
            names = explorer.checkpoint_names
            shares = ", ".join(f"{names[m]}: {share:.0%}" for m, share in enumerate(query.agreement))
            lines.append(f"**Per-checkpoint agreement** (share of the top-{len(query.proponents)} proponents in each "
                         f"checkpoint's own top-{len(query.proponents)}): {shares}")  # fmt: skip
        shown = ([n.row for n in query.proponents], [n.row for n in query.opponents])
        widgets = []
        for name in explorer.text_columns:
            widgets.append(query.target.get(name, "") if fill else self.gr.update())
        if self.image is not None:
            widgets.append(self.images.path(query.target.get(explorer.image_column)) if fill else self.gr.update())
        if self.label is not None:
            widgets.append(PREDICTED if fill else self.gr.update())
        if self.target_view is not None:
            widgets.append(self.images.path(enlarged(query.target.get(explorer.image_column))))
        if self.row is not None:  # the target row's number, or empty for a train row or a new input
            widgets.append(row)
        page = ["", "\n\n".join(lines), self._render(query.proponents), self._render(query.opponents), shown]
        page.append((query.target, query.label))
        if self.tokens is not None:  # the token view of the previous target is not left under this one's results
            page.append("")
        return page + widgets

    def _render(self, neighbors) -> Any:
        explorer = self.explorer
        if explorer.image_column is not None:
            shown = [enlarged(n.example[explorer.image_column]) for n in neighbors]
            return [(self.images.path(image), self._caption(n)) for image, n in zip(shown, neighbors)]
        label_column = explorer.label_column
        rows = []
        for rank, n in enumerate(neighbors):
            label = [explorer.label_name(n.example.get(label_column))] if label_column else []
            texts = [str(n.example.get(name, ""))[:TEXT_PREVIEW] for name in explorer.text_columns]
            rows.append([rank + 1, n.row, round(n.score, 6)] + label + texts)
        return rows

    def _caption(self, neighbor) -> str:
        explorer = self.explorer
        parts = [f"#{neighbor.row}", f"{neighbor.score:+.3g}"]
        if explorer.label_column:
            parts.insert(1, explorer.label_name(neighbor.example.get(explorer.label_column)))
        parts += [str(neighbor.example.get(name, ""))[:60] for name in explorer.text_columns]
        return " · ".join(parts)


TOKEN_VIEW = (
    SHADE_MACRO
    + """<div><b>Target</b> (its tokens the proponents reach; green: raised, red: lowered):
<div>{{ shade(target) }}</div></div>
{% for row in rows %}<div style="margin-top: 0.6em"><b>#{{ row.index }}</b> score {{ "%+.4g"|format(row.score) }}
{% if row.pooled %}(pooled layers {{ "%+.3g"|format(row.pooled) }}){% endif %}<div>{{ shade(row.tokens) }}</div></div>
{% endfor %}"""
)


def token_view(explorer: Explorer, found) -> str:
    """HTML of ``Explorer.token_scores``' result: the target's tokens, then each train row's, shaded."""
    import jinja2

    processor = explorer.processor
    reached = np.sum([tokens.target_tokens for tokens in found], axis=0).tolist()
    rows = [
        {"index": t.train_index, "score": t.score, "pooled": t.train_pooled,
         "tokens": shaded(token_names(processor, t.train_ids), t.train_tokens.tolist())}
        for t in found
    ]  # fmt: skip
    target = shaded(token_names(processor, found[0].target_ids), reached)
    return jinja2.Environment(autoescape=True).from_string(TOKEN_VIEW).render(target=target, rows=rows)


def explore(
    store: str,
    train_dataset,
    model=None,
    processor: Any = "auto",
    targets=None,
    index: Optional[str] = None,
    k: int = 10,
    launch: bool = True,
    block: Optional[bool] = None,
    quiet: bool = False,
    server_name: Optional[str] = None,
    server_port: Optional[int] = None,
    title: str = "hf_trak explorer",
    max_upload_mb: float = MAX_UPLOAD_MB,
    **explorer_kwargs,
):
    """Start the explorer of feature store ``store`` (a folder, or a repo id pushed with ``push_to_hub``).

    ``train_dataset``: the raw train split the store was made from (``load_dataset(...)``);
    ``model``: default, the model the store records; ``processor``: default, the one saved with
    the model; ``targets``: an optional raw split to pick targets from; ``index``: None (exact
    scores from the store), ``"exact"`` or a faiss factory string (``hf_trak.explore.index``);
    ``explorer_kwargs`` go to ``Explorer.from_store`` (``base_model``, ``text_column``,
    ``device``...). With ``launch`` the app is served on ``server_name:server_port`` (default:
    Gradio's, ``GRADIO_SERVER_NAME``/``GRADIO_SERVER_PORT`` or 127.0.0.1:7860 up) and, as
    Gradio's ``launch`` does, serves until interrupted in a script and returns at once in a
    notebook or REPL (``block`` True/False decides instead); ``quiet`` hides Gradio's own
    message with the URL (``blocks.local_url``); uploads over ``max_upload_mb`` are refused with a message.
    Returns the Gradio ``Blocks``.
    """
    require_gradio()
    try:
        explorer = Explorer.from_store(store, train_dataset, model, processor, targets, index=index, k=k,
                                       **explorer_kwargs)  # fmt: skip
        app = ExplorerApp(explorer, title=title)
    except Exception as error:  # the page says why (a Space has no terminal to read)
        logger.error("The explorer cannot start: %s", error)
        app = ExplorerApp(None, error=str(error), title=title)
    if launch:
        serve(app.blocks, block, quiet, server_name, server_port, max_upload_mb)
    return app.blocks


def serve(blocks, block: Optional[bool] = None, quiet: bool = False, server_name=None, server_port=None,
          max_upload_mb: float = MAX_UPLOAD_MB):  # fmt: skip
    """Serve ``blocks`` as ``explore`` does (see there), refusing uploads over ``max_upload_mb``; returns them."""
    if isinstance(max_upload_mb, bool) or not isinstance(max_upload_mb, (int, float)) or not max_upload_mb > 0:
        raise InvalidArgumentError(f"max_upload_mb must be a number of megabytes > 0, got {max_upload_mb!r}.")
    styled = {"css": GALLERY_CSS} if _css_at_launch() else {}
    blocks.launch(server_name=server_name, server_port=server_port, prevent_thread_lock=True, quiet=quiet,
                  max_file_size=int(max_upload_mb * 2**20), **styled)  # fmt: skip
    interactive = hasattr(sys, "ps1") or "ipykernel" in sys.modules
    if block or (block is None and not interactive):
        blocks.block_thread()
    return blocks
