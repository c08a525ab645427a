"""The page's images: each written once, losslessly, to a PNG file of its own that Gradio serves.

Gradio saves an image value (a PIL image, an array) to its cache on every answer, by rewriting the
file named by the image's hash in place and, for ``gr.Image``, as lossy WebP. Both bite here:

- two clients shown the same train example at once: one fetches the file while the other's answer
  rewrites it, and gets a truncated body (``peer closed connection without sending complete message
  body``);
- a target row shown in the image input comes back as WebP when "Attribute" is pressed, so the
  page would attribute another image than the row's.

A file path is copied into Gradio's cache under a temporary name and renamed into place, once. The
file given here is written the same way: under a temporary name, renamed to the SHA-256 of its PNG
bytes, and never rewritten.
"""

import hashlib
import io
import os
import shutil
import tempfile
import weakref
from typing import Any, Optional


def enlarged(image, size: int = 160):
    """A small image scaled up (nearest pixel) to about ``size`` pixels, to look at; larger ones as they are."""
    if image is None or not hasattr(image, "resize") or max(image.size) >= size:
        return image
    factor = max(1, size // max(image.size))
    return image.resize((image.size[0] * factor, image.size[1] * factor), resample=0)


class ImageFiles:
    """PNG files of the images shown, in ``folder`` (default: a temporary folder, made when the first image is
    written, so a page without images makes none, and removed with this object)."""

    def __init__(self, folder: Optional[str] = None):
        if folder is not None:
            os.makedirs(folder, exist_ok=True)
        self.folder = folder

    def _ready_folder(self) -> str:
        if self.folder is None:
            self.folder = tempfile.mkdtemp(prefix="hf_trak_explorer_")
            weakref.finalize(self, shutil.rmtree, self.folder, True)
        return self.folder

    def path(self, image) -> Any:
        """The path of ``image``'s PNG file (written on first use); ``image`` itself if it is no PIL image or has a
        mode PNG cannot hold (Gradio then saves it as it would)."""
        if image is None or not hasattr(image, "save"):
            return image
        buffer = io.BytesIO()
        try:
            image.save(buffer, format="PNG")
        except (OSError, ValueError, KeyError):  # e.g. CMYK: no PNG of it
            return image
        data = buffer.getvalue()
        folder = self._ready_folder()
        path = os.path.join(folder, hashlib.sha256(data).hexdigest() + ".png")
        if not os.path.exists(path):
            descriptor, staging = tempfile.mkstemp(dir=folder, prefix=".", suffix=".part")
            try:
                with os.fdopen(descriptor, "wb") as file:
                    file.write(data)
                os.replace(staging, path)
            except BaseException:
                os.unlink(staging)
                raise
        return path
