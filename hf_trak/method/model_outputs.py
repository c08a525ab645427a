"""Model output functions: the f(z; θ) that TRAK attributes and its Q = ∂ℓ/∂f.

One module for the base class, the four shipped output functions (each with its derivation)
and ``AutoModelOutput``: over 300 lines because the derivations are the documentation.

Vocabulary of traker's "Applying TRAK to a custom task" tutorials:

* ``get_output(model, weights, buffers, batch)`` is the model output function f for ONE
  example (every tensor in ``batch`` has a leading dimension of 1). It returns a scalar and
  must be differentiable with ``torch.func`` (no ``.item()``, no indexing with label
  tensors), because per-example gradients are ``vmap(grad(get_output))``.
* ``get_out_to_loss_grad(model, weights, buffers, batch)`` is the analytic output-to-loss
  gradient Q for a whole batch: a tensor of shape ``(B,)`` (no autograd).

``weights`` and ``buffers`` are dicts ``name -> tensor`` passed to
``torch.func.functional_call``; the model's own tensors are never used or modified.
"""

import contextlib
import copy
import math
from abc import ABC, abstractmethod
from typing import Callable, Mapping, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

from hf_trak.errors import InvalidArgumentError, NotFeaturizedError
from hf_trak.hf.sharding import is_fsdp
from hf_trak.method.shared_outputs import reuse_or_run

Batch = Mapping[str, Tensor]


class LabelSpace(NamedTuple):
    """Labels a head accepts: integers in [0, size), or ``ignore_index`` (positions without a label).
    ``size_name`` is the config attribute giving ``size``; ``noun`` what one label is."""

    size: int
    ignore_index: Optional[int]
    size_name: str
    noun: str


def call_model(model: nn.Module, weights: Mapping[str, Tensor], buffers: Mapping[str, Tensor], inputs: Batch):
    """``model(**inputs)`` evaluated at ``weights``/``buffers`` with ``torch.func.functional_call`` (or its
    outputs kept from the featurizing forward pass: ``hf_trak.method.shared_outputs``). An FSDP-sharded model runs
    its own forward, at its own weights, which are then the checkpoint's (``hf_trak.hf.sharding``)."""
    if is_fsdp(model):
        return reuse_or_run(model, inputs, lambda: model(**inputs))
    return reuse_or_run(
        model, inputs, lambda: torch.func.functional_call(model, {**weights, **buffers}, args=(), kwargs=dict(inputs))
    )


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Run ``model`` in eval mode (no dropout), restoring its mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def without_labels(batch: Batch) -> dict:
    return {name: value for name, value in batch.items() if name != "labels"}


def _logits(output) -> Tensor:
    return output if isinstance(output, Tensor) else output.logits


class AbstractModelOutput(ABC):
    """Base class of model output functions; subclass it for a custom task.

    ``required_columns`` names the batch entries the task reads besides the model's own
    inputs; a dataset without them is refused before any work starts.
    """

    required_columns: Sequence[str] = ("labels",)

    def check_model(self, model: nn.Module) -> None:
        """Raise a ``ValueError`` if this model output function does not fit ``model``."""

    def at_checkpoint(
        self,
        model: nn.Module,
        weights: Mapping[str, Tensor],
        buffers: Mapping[str, Tensor],
        sample_train_batch: Callable[[int, int], Batch],
    ) -> "AbstractModelOutput":
        """This model output function at one checkpoint, before its examples are featurized or scored.

        The default is ``self``. A task whose f depends on other examples (CLIP) returns a copy
        bound to what it computed there; ``sample_train_batch(num_examples, seed)`` gives a
        prepared batch of training examples drawn with that seed. The instance is never changed.
        """
        return self

    @abstractmethod
    def get_output(
        self, model: nn.Module, weights: Mapping[str, Tensor], buffers: Mapping[str, Tensor], batch: Batch
    ) -> Tensor:
        """f(z; θ) for one example: a scalar tensor."""

    @abstractmethod
    def get_out_to_loss_grad(
        self, model: nn.Module, weights: Mapping[str, Tensor], buffers: Mapping[str, Tensor], batch: Batch
    ) -> Tensor:
        """Q for each example of the batch, shape ``(B,)``."""

    def settings(self) -> dict:
        """JSON-serialisable settings that change f or Q (recorded with stored features)."""
        return {}

    def label_space(self, model: nn.Module) -> Optional[LabelSpace]:
        """The values ``labels`` may take for ``model`` (checked on every row before compute), or None:
        not checked (the default, for custom tasks)."""
        return None


class ClassificationModelOutput(AbstractModelOutput):
    """Multiclass margin, for single-label classification heads.

    With logits g and correct class y, p = softmax(g)_y and

        f(z; θ) = log(p / (1 − p)) = g_y − logsumexp_{j≠y} g_j,
        ℓ = −log p = log(1 + exp(−f)),   ∂ℓ/∂f = −(1 − p),   Q = 1 − softmax(g / T)_y.

    The class is selected with ``arange(C) == y`` (never by indexing with ``y``) so the
    function can be ``vmap``-ed.
    """

    def __init__(self, temperature: float = 1.0):
        self.temperature = temperature

    def check_model(self, model: nn.Module) -> None:
        config = getattr(model, "config", None)
        if config is None:
            return
        problem_type = getattr(config, "problem_type", None)
        if problem_type in ("regression", "multi_label_classification") or (
            problem_type is None and getattr(config, "num_labels", 2) == 1
        ):
            kind = problem_type or "regression (num_labels=1)"
            raise InvalidArgumentError(
                f"{type(self).__name__} attributes single-label classification (softmax cross-entropy), but the "
                f"model's problem_type is {kind}. Its loss has no margin of the correct class: subclass "
                "AbstractModelOutput with a model output function for your loss, or set "
                "config.problem_type='single_label_classification' if the model is trained with cross-entropy."
            )

    def label_space(self, model: nn.Module) -> Optional[LabelSpace]:
        num_labels = getattr(getattr(model, "config", None), "num_labels", None)
        return LabelSpace(num_labels, None, "num_labels", "class of the model's head") if num_labels else None

    @staticmethod
    def _is_label(logits: Tensor, labels: Tensor) -> Tensor:
        classes = torch.arange(logits.shape[-1], device=logits.device)
        return classes == labels.unsqueeze(-1)

    def get_output(self, model, weights, buffers, batch) -> Tensor:
        logits = _logits(call_model(model, weights, buffers, without_labels(batch)))
        is_label = self._is_label(logits, batch["labels"])
        correct = torch.where(is_label, logits, torch.zeros_like(logits)).sum(-1)
        others = logits.masked_fill(is_label, float("-inf")).logsumexp(-1)
        return (correct - others).sum()

    def get_out_to_loss_grad(self, model, weights, buffers, batch) -> Tensor:
        logits = _logits(call_model(model, weights, buffers, without_labels(batch)))
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        p_correct = (probs * self._is_label(logits, batch["labels"])).sum(-1)
        return (1.0 - p_correct).detach()

    def settings(self) -> dict:
        return {"temperature": self.temperature}


class SequenceClassificationModelOutput(ClassificationModelOutput):
    """Margin f = logit_y − logsumexp_{j≠y} logit_j for ``*ForSequenceClassification`` heads."""


class ImageClassificationModelOutput(ClassificationModelOutput):
    """Margin f = logit_y − logsumexp_{j≠y} logit_j for ``*ForImageClassification`` heads."""


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − exp(x)) for x < 0, stable at both ends (Mächler, 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


class CausalLMModelOutput(AbstractModelOutput):
    """Sequence log-likelihood margin for ``*ForCausalLM`` heads.

    The label tokens y_t (``labels`` with −100 masked, shifted by one as the HF loss does)
    have probability p = Π_t p_θ(y_t | y_<t), log p = Σ_t log softmax(g_t)_{y_t}. Treating
    the whole completion as one "correct class" as in classification:

        f(z; θ) = log(p / (1 − p)) = log p − log(1 − exp(log p)),
        ℓ = −log p = log(1 + exp(−f)),   ∂ℓ/∂f = −(1 − p),   Q = 1 − p.
    """

    def get_output(self, model, weights, buffers, batch) -> Tensor:
        logits = _logits(call_model(model, weights, buffers, without_labels(batch)))
        log_p = self._sequence_log_prob(logits, batch["labels"])
        # p = 1 exactly would give f = +inf; the margin of a certain sequence is capped.
        log_p = log_p.clamp(max=-1e-6)
        return (log_p - _log1mexp(log_p)).sum()

    def get_out_to_loss_grad(self, model, weights, buffers, batch) -> Tensor:
        logits = _logits(call_model(model, weights, buffers, without_labels(batch)))
        return (1.0 - self._sequence_log_prob(logits, batch["labels"]).exp()).detach()

    def label_space(self, model: nn.Module) -> Optional[LabelSpace]:
        vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
        return LabelSpace(vocab_size, -100, "vocab_size", "token id of the vocabulary") if vocab_size else None

    @staticmethod
    def _sequence_log_prob(logits: Tensor, labels: Tensor) -> Tensor:
        """Σ_t log softmax(g_t)_{y_{t+1}} over unmasked labels, shape ``(B,)``."""
        logits, labels = logits[:, :-1].float(), labels[:, 1:]
        is_label = labels != -100
        token_log_probs = torch.log_softmax(logits, dim=-1)
        picked = token_log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return torch.where(is_label, picked, torch.zeros_like(picked)).sum(-1)


class CLIPModelOutput(AbstractModelOutput):
    """CLIP model output function of the traker CLIP tutorial, for ``CLIPModel``.

    φ, ψ are the L2-normalised image and text embeddings, S_ij = φ_i · ψ_j, and C is a set
    of ``num_contrast`` training pairs sampled (with ``seed``) at each checkpoint; their
    embeddings are constants. For a pair i:

        f(z_i; θ) = −log Σ_{j∈C} exp(−(S_ii − φ_i·ψ_j)) − log Σ_{j∈C} exp(−(S_ii − ψ_i·φ_j)),
        Q_i = 1 − (p_i^img + p_i^txt) / 2,

    with p_i^img = softmax(τ [S_ii, (φ_i·ψ_j)_{j∈C}])_0, p_i^txt likewise with φ and ψ
    swapped, and τ = exp(logit_scale) the model's temperature. Q is computed against C,
    not against the other pairs of the batch, so it is non-zero and the same for every
    batch size (traker's version is identically 0 at batch size 1).
    """

    required_columns = ("input_ids", "pixel_values")

    def __init__(self, num_contrast: int = 64, seed: int = 0):
        if num_contrast < 1:
            raise InvalidArgumentError(f"num_contrast must be >= 1, got {num_contrast}.")
        self.num_contrast = num_contrast
        self.seed = seed
        self.contrast_image_embeds: Optional[Tensor] = None
        self.contrast_text_embeds: Optional[Tensor] = None

    def at_checkpoint(self, model, weights, buffers, sample_train_batch) -> "CLIPModelOutput":
        """A copy holding the contrast set's embeddings at this checkpoint."""
        with torch.no_grad():
            output = call_model(model, weights, buffers, sample_train_batch(self.num_contrast, self.seed))
        bound = copy.copy(self)
        bound.contrast_image_embeds = output.image_embeds.detach()
        bound.contrast_text_embeds = output.text_embeds.detach()
        return bound

    def _embeddings(self, model, weights, buffers, batch):
        if self.contrast_image_embeds is None:
            raise NotFeaturizedError(
                "CLIPModelOutput needs its contrast set of training examples: evaluate the output function that "
                "at_checkpoint(...) returns."
            )
        output = call_model(model, weights, buffers, without_labels(batch))
        return output.image_embeds, output.text_embeds

    def get_output(self, model, weights, buffers, batch) -> Tensor:
        image, text = self._embeddings(model, weights, buffers, batch)
        s_ii = (image * text).sum(-1, keepdim=True)
        image_vs_texts = image @ self.contrast_text_embeds.T
        text_vs_images = text @ self.contrast_image_embeds.T
        result = -torch.logsumexp(-(s_ii - image_vs_texts), dim=-1) - torch.logsumexp(-(s_ii - text_vs_images), dim=-1)
        return result.sum()

    def get_out_to_loss_grad(self, model, weights, buffers, batch) -> Tensor:
        image, text = self._embeddings(model, weights, buffers, batch)
        temperature = self._logit_scale({**weights, **buffers}).exp()
        s_ii = (image * text).sum(-1, keepdim=True)
        image_logits = torch.cat([s_ii, image @ self.contrast_text_embeds.T], dim=-1) * temperature
        text_logits = torch.cat([s_ii, text @ self.contrast_image_embeds.T], dim=-1) * temperature
        p = (torch.softmax(image_logits, dim=-1)[:, 0] + torch.softmax(text_logits, dim=-1)[:, 0]) / 2
        return (1.0 - p).detach()

    @staticmethod
    def _logit_scale(tensors: Mapping[str, Tensor]) -> Tensor:
        """CLIP's ``logit_scale`` (``base_model.model.logit_scale`` under a PEFT wrapper)."""
        return next(value for name, value in tensors.items() if name.split(".")[-1] == "logit_scale")

    def settings(self) -> dict:
        return {"num_contrast": self.num_contrast, "seed": self.seed}


TASKS = {
    "text_classification": SequenceClassificationModelOutput,
    "image_classification": ImageClassificationModelOutput,
    "clip": CLIPModelOutput,
    "causal_lm": CausalLMModelOutput,
}


def _head_names() -> dict:
    """Model class names of each supported head, from transformers' auto mappings."""
    from transformers.models.auto import modeling_auto as auto

    return {
        "text_classification": set(auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.values()),
        "image_classification": set(auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES.values()),
        "causal_lm": set(auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()),
        "clip": {"CLIPModel"},
    }


class AutoModelOutput:
    """Picks the model output function of a model head or task name.

    >>> AutoModelOutput.from_model(BertForSequenceClassification(config))   # margin
    >>> AutoModelOutput.from_task("causal_lm")
    """

    @staticmethod
    def from_task(task: str, **kwargs) -> AbstractModelOutput:
        if task not in TASKS:
            raise InvalidArgumentError(
                f"Unknown task {task!r}; choose one of {sorted(TASKS)} or pass an AbstractModelOutput."
            )
        return TASKS[task](**kwargs)

    @staticmethod
    def from_model(model: nn.Module, **kwargs) -> AbstractModelOutput:
        """The output function of ``model``'s head (looked up through a PEFT wrapper)."""
        from hf_trak.hf.adapters import head_model

        heads = _head_names()
        for cls in type(head_model(model)).__mro__:
            for task, names in heads.items():
                if cls.__name__ in names:
                    return AutoModelOutput.from_task(task, **kwargs)
        raise InvalidArgumentError(
            f"hf_trak has no model output function for {type(model).__name__}. Supported heads: "
            "*ForSequenceClassification, *ForImageClassification, *ForCausalLM and CLIPModel. Pass "
            f"task= one of {sorted(TASKS)}, or a subclass of AbstractModelOutput for a custom head."
        )

    @staticmethod
    def resolve(model: nn.Module, task=None) -> AbstractModelOutput:
        """``task`` as given (instance, class, name) or, if None, from the model head."""
        if task is None:
            return AutoModelOutput.from_model(model)
        if isinstance(task, str):
            return AutoModelOutput.from_task(task)
        if isinstance(task, type) and issubclass(task, AbstractModelOutput):
            return task()
        if isinstance(task, AbstractModelOutput):
            return task
        raise InvalidArgumentError(f"task must be None, a task name, or an AbstractModelOutput; got {task!r}.")
