"""hf_trak's explorer as a Hugging Face Space: a features repo on the Hub, its model and its dataset.

Set these as the Space's variables (Settings → Variables), or in the environment to run it locally
(``python examples/space/app.py``, then open http://127.0.0.1:7860):

    HF_TRAK_STORE           the features repo pushed with push_to_hub / hf-trak push ("me/imdb-trak"), or a folder
    HF_TRAK_DATASET         what load_dataset takes ("imdb"), or a save_to_disk folder
    HF_TRAK_MODEL           optional: the model (default: the one the store records)
    HF_TRAK_DATASET_CONFIG  optional: load_dataset's configuration name
    HF_TRAK_TRAIN_SPLIT     optional, default "train": the split the features were made from
    HF_TRAK_TARGET_SPLIT    optional, default "test" ("" for none): targets to pick from
    HF_TRAK_INDEX           optional: "exact" or a faiss factory string such as "IVF1024,Flat"
    HF_TRAK_K               optional, default 10: proponents and opponents shown

A private repo needs the Space secret HF_TOKEN. Missing settings are shown in the page.
"""

import os

from datasets import load_dataset, load_from_disk

import hf_trak

TITLE = "hf_trak explorer"


def split(name: str):
    dataset = os.environ["HF_TRAK_DATASET"]
    if os.path.isdir(dataset):
        return load_from_disk(dataset)[name]
    return load_dataset(dataset, os.environ.get("HF_TRAK_DATASET_CONFIG") or None, split=name)


def message_page(text: str):
    """A page with one message (markdown's special characters escaped), for what is missing or failed."""
    import gradio as gr

    escaped = "".join("\\" + c if c in "\\`*_{}[]<>()#+-.!|~" else c for c in " ".join(text.split()))
    with gr.Blocks(title=TITLE, analytics_enabled=False) as page:
        gr.Markdown(f"# {TITLE}")
        gr.Markdown(f"**Error:** {escaped}", elem_id="message")
    return page


def build():
    """The explorer's Blocks, or a page that says what is missing or failed (a Space has no terminal)."""
    missing = [name for name in ("HF_TRAK_STORE", "HF_TRAK_DATASET") if not os.environ.get(name)]
    if missing:
        return message_page(f"Set the Space variables {', '.join(missing)} (see app.py).")
    target_split = os.environ.get("HF_TRAK_TARGET_SPLIT", "test")
    try:
        train = split(os.environ.get("HF_TRAK_TRAIN_SPLIT", "train"))
        targets = split(target_split) if target_split else None
    except Exception as error:  # noqa: BLE001 (shown in the page)
        return message_page(f"Cannot load {os.environ['HF_TRAK_DATASET']}: {error}")
    return hf_trak.explore(
        os.environ["HF_TRAK_STORE"],
        train,
        model=os.environ.get("HF_TRAK_MODEL") or None,
        targets=targets,
        index=os.environ.get("HF_TRAK_INDEX") or None,
        k=int(os.environ.get("HF_TRAK_K", "10")),
        launch=False,
        title=TITLE,
    )


demo = build()

if __name__ == "__main__":
    demo.launch()
