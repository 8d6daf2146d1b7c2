"""What the explainer needs from any captioner, and the plumbing they all share.

A captioner is an image encoder whose activations we can take Grad-CAM on — a ViT's patch tokens or a CNN's
feature maps (`vision_grid` makes a grid of either) — and a text decoder, which may cross-attend to the image
tokens (BLIP, ViT-GPT2) or not (ClipCap, whose GPT-2 sees the image as a prefix: `num_decoder_layers` is 0 and
`no_cross_attention` says why). A new captioner subclasses `Captioner` and implements the handful of abstract
methods below (model loading, preprocessing, generation, one teacher-forced forward, how its tokenizer marks
word pieces); everything else — caption alignment, attribution, grounding — is shared. It says which models it
runs (`model_types`, `handles`) and which friendly names it offers (`models`), and is registered with
`ipag.captioners.register` or an entry point (docs/plugins.md).

A caption's token sequence starts with what the model is given before it writes (`start_ids`): a decoder's start
token, or a vision-language model's whole prompt — its chat template around an instruction, with the image's
placeholder tokens — so that the sequence alone determines every teacher-forced computation (and cache key);
`answer_start` says where the written part begins.
"""

from __future__ import annotations

import threading
import unicodedata
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from collections.abc import Mapping, Sequence
from typing import ClassVar, Iterator, Literal

import torch
from PIL import Image
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.generation.streamers import BaseStreamer
from transformers.image_processing_utils import BaseImageProcessor

from ..errors import SettingError
from ..layout import Layout
from ..precision import FLOAT32, Precision, Stage
from ..target import token_logprobs

PieceKind = Literal["start", "continue", "punct", "special"]


@dataclass(frozen=True)
class DecodeOptions:
    """How to generate a caption. `num_beams=1` is greedy decoding; the end token counts as a new token.
    (`Settings` declares and checks them but `min_new_tokens`; `Explainer.decode_options` makes these from it.)"""

    num_beams: int = 1
    max_new_tokens: int = 20
    min_new_tokens: int | None = None  # None: the model's own minimum (its generation config)
    instruction: str | None = None  #: what a vision-language model is asked; None: its default (others ignore it)

    def __post_init__(self) -> None:
        if self.min_new_tokens is not None and not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be between 0 and max_new_tokens ({self.max_new_tokens}), "
                             f"got {self.min_new_tokens}.")


@dataclass(frozen=True)
class Piece:
    """A token as the word aligner sees it: its printable text and whether it starts a word."""

    text: str
    kind: PieceKind


@dataclass
class Attentions:
    """Every attention probability tensor of one forward, batch first and in the autograd graph (methods that
    propagate relevance through all layers take gradients on them): the vision encoder's self-attention per
    block (B, heads, N, N), and per decoder layer its self-attention (B, heads, T, T) and its cross-attention to
    the image tokens (B, heads, T, N) — none for a decoder-only language model, whose self-attention covers the
    image tokens. `encoder`: the self-attention of an encoder between the vision tower and the decoder, over the
    decoder's cross-attention keys (Florence-2's text-and-image encoder)."""

    vision: list[torch.Tensor]
    decoder_self: list[torch.Tensor]
    decoder_cross: list[torch.Tensor]
    encoder: list[torch.Tensor] = field(default_factory=list)


@dataclass
class DecoderPass:
    """Everything one teacher-forced forward exposes to attribution, still attached to the autograd graph.

    `vision_output` is the chosen vision layer's output as the layer returned it (ViT tokens with their CLS
    token, or CNN feature maps; `Captioner.vision_grid` arranges it, or its gradient, as a grid) and
    `cross_attention` the chosen decoder layer's attention probabilities from the caption to the image (B, heads,
    rows, keys) — its cross-attention, or a decoder-only language model's self-attention, whose keys hold the image
    tokens among the text — None for a decoder without either. Both are kept whole, because gradients exist only
    for tensors of the graph itself (a slice taken afterwards would get none). The layouts say where the vision
    grid's cells and the attention's keys lie on the pixel input (`ipag.layout`); the attention's rows that
    predict a target are the target's rows shifted by `row_offset` (a decoder that does not see the prompt), or
    `query_rows` for every target (BLIP-2's Q-Former, whose queries alone look at the image); then `query_weights`
    (B, T, queries) says how much each row of the sequence reads each query (BLIP-2's language model's attention to
    the query tokens), by which the raw attention map weighs the queries for a target.
    """

    vision_layer: str  #: qualified module name of the vision layer
    attention_layer: str | None
    pixel_values: torch.Tensor
    logprobs: torch.Tensor  #: (1, T, vocab) log-softmax of the decoder's logits
    vision_output: torch.Tensor
    cross_attention: torch.Tensor | None
    grid: tuple[int, int]  #: (gh, gw) of `vision_grid(vision_output)`
    vision_layout: Layout
    attention_layout: Layout | None = None
    row_offset: int = 0
    query_rows: tuple[int, ...] | None = None
    query_weights: torch.Tensor | None = None
    vision_index: int = -1  #: which of `Captioner.vision_layers` made `vision_output` (non-negative)
    attentions: Attentions | None = None  #: every layer's attention, when asked for


class Captioner(ABC):
    """Base class: subclasses hold a frozen model and say how to run it; see the module docstring."""

    name: ClassVar[str]
    #: What the page calls it in sentences ("BLIP is 99.9% sure of …"); empty: its registry `name` (`short_name`).
    title: ClassVar[str] = ""
    #: The transformers `model_type`s of the configs this class runs (`load_captioner` dispatches on them).
    model_types: ClassVar[tuple[str, ...]] = ()
    #: The friendly names the page and the CLI offer for this class, and the model (hub id or path) of each.
    models: ClassVar[Mapping[str, str]] = {}
    #: Why the decoder has no cross-attention to the image, for a captioner without it (`num_decoder_layers` 0);
    #: shown where the cross-attention map would be.
    no_cross_attention: ClassVar[str | None] = None
    #: Neutral text a free query is appended to, so log p(query | image) is a caption-like continuation.
    neutral_prompt: ClassVar[str] = "a picture of"
    #: What the captioner is asked when the user asks nothing else (a vision-language model's instruction; the page
    #: shows it as its instruction box's placeholder). None: it takes no instruction, its prompt is fixed.
    default_instruction: ClassVar[str | None] = None

    def __init__(self, model: nn.Module, image_processor: BaseImageProcessor, device: torch.device,
                 model_id: str) -> None:
        placed = getattr(model, "hf_device_map", None)  # spread over devices by `device_map` already: leave it
        self.model = (model if placed else model.to(device)).eval().requires_grad_(False)
        self.image_processor = image_processor
        self.device = device
        self.model_id = model_id
        #: Which stages compute in bfloat16 (`ipag.precision`; see `autocast`): none unless the explainer says so
        #: (`--precision`, "auto" by default), so that a captioner built directly computes exactly.
        self.precision: Precision = FLOAT32
        #: Whether backward passes recompute `checkpointed_layers` instead of keeping their activations (a captioner
        #: turns it on for models big enough to need it; see `checkpointed`).
        self.gradient_checkpointing = False

    # --- what each captioner implements -------------------------------------------------------------------

    @classmethod
    def handles(cls, model_id: str) -> bool:
        """Whether this class loads `model_id` although it has no transformers config (a checkpoint file in a
        format of its own); `load_captioner` asks before it reads a config."""
        return False

    @classmethod
    def tiny(cls, seed: int = 0, device: torch.device = torch.device("cpu")) -> "Captioner":
        """A tiny random model of this class, built offline in seconds (`--tiny`, tests and CI)."""
        raise NotImplementedError(f"The {cls.name} captioner has no tiny random version.")

    @classmethod
    @abstractmethod
    def load(cls, model_id: str, device: torch.device, local_files_only: bool = False) -> "Captioner":
        """Load from a hub id or a local folder (`load_captioner` picks the class from the model's config);
        `local_files_only` forbids downloading."""

    @property
    @abstractmethod
    def vision_layers(self) -> list[nn.Module]:
        """The vision encoder's layers Grad-CAM can use, first to last (transformer blocks, or a CNN's stages)."""

    @property
    @abstractmethod
    def num_decoder_layers(self) -> int:
        """How many decoder layers have cross-attention (0: none, see `no_cross_attention`)."""

    @abstractmethod
    def _generate_inputs(self, pixel_values: torch.Tensor, start: list[int]) -> dict:
        """The image and this model's other arguments to `generator.generate` (token suppression, masks), for a
        caption that starts with `start` (`start_ids`)."""

    @abstractmethod
    def _caption_end(self, sequence: list[int]) -> int:
        """Where the caption in `sequence` (the start token, then what generation wrote) ends: its length."""

    @abstractmethod
    def _forward(self, pixel_values: torch.Tensor, token_ids: torch.Tensor,
                 cross_attention_layer: int | None) -> tuple:
        """Teacher-forced forward of a batch of images on one sequence (`token_ids` is (B, T)): (logits (B, T, V),
        that decoder layer's cross-attention probs (B, heads, T, 1+N) or (B, heads, T, N); None for no layer)."""

    def _forward_with_attentions(self, pixel_values: torch.Tensor, token_ids: torch.Tensor) -> tuple:
        """`_forward`, and every layer's attention probabilities (logits, `Attentions`). Captioners whose
        attention all lives in explicit probability tensors implement it; the others cannot have the maps that
        need it (see `exposes_attentions`)."""
        raise NotImplementedError(f"The {self.name} captioner does not expose its attention probabilities.")

    @property
    def checkpointed_layers(self) -> list[nn.Module]:
        """The layers whose activations a backward pass recomputes when `gradient_checkpointing` is on (none here:
        a captioner whose family gains from it names its language model's layers)."""
        return []

    def _checkpointing(self) -> AbstractContextManager[None]:
        return checkpointed(self.checkpointed_layers if self.gradient_checkpointing else [])

    @property
    def exposes_attentions(self) -> bool:
        """Whether `_forward_with_attentions` is implemented (relevance propagation needs every attention map)."""
        return type(self)._forward_with_attentions is not Captioner._forward_with_attentions

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` without special tokens."""

    @abstractmethod
    def start_ids(self, pixel_values: torch.Tensor | None = None, instruction: str | None = None) -> list[int]:
        """The token(s) a caption of this image starts with: the decoder's start token (BLIP's [DEC]), or a
        vision-language model's prompt asking `instruction` (None: its default) about `pixel_values`."""

    @property
    def takes_instruction(self) -> bool:
        """Whether the captioner answers an instruction (it has a default one; BLIP-2's is the empty prompt)."""
        return self.default_instruction is not None

    def instruction(self, asked: str | None) -> str | None:
        """The instruction a caption is made with: `asked`, else the captioner's own; None when it is asked nothing
        (it takes no instruction, whatever was asked, or its own is empty: BLIP-2). Made concrete before any cache key,
        so that equal prompts get equal keys."""
        instruction = (asked or self.default_instruction or None) if self.takes_instruction else None
        if instruction is not None:
            try:
                self.start_ids(instruction=instruction)  # its prompt, made once: the processor may refuse it
            except ValueError as err:
                raise SettingError(f"{self.short_name} cannot be asked {instruction!r}: {err}") from err
        return instruction

    def answer_start(self, token_ids: Sequence[int]) -> int:
        """Where the written part of a caption's `token_ids` begins (after `start_ids`)."""
        return len(self.start_ids())

    def unavailable_map(self, key: str) -> str | None:
        """Why this captioner cannot have the map type `key`, beyond what the map type itself checks (None: it can)."""
        return None

    @abstractmethod
    def token_strings(self, token_ids: list[int]) -> list[str]:
        """The tokenizer's string for each id (for display)."""

    @abstractmethod
    def pieces(self, token_ids: list[int]) -> list[Piece]:
        """How the aligner should treat each token (word start, continuation, punctuation, special)."""

    # --- shared plumbing ------------------------------------------------------------------------------------

    def describe(self) -> str:
        return f"{self.name} ({self.model_id})"

    @property
    def short_name(self) -> str:
        """The captioner's name in the page's labels and sentences."""
        return self.title or self.name

    @property
    def generator(self) -> nn.Module:
        """The transformers model whose `generate` writes the captions."""
        return self.model

    def vision_grid(self, output: torch.Tensor) -> torch.Tensor:
        """A vision layer's output, or its gradient (same layout), as the (B, D, gh, gw) grid grad-cam's weighting
        expects. This default is for ViT blocks: tokens (B, 1+N, D), a CLS token and N patches on a square grid."""
        side = int(round((output.shape[1] - 1) ** 0.5))
        if side * side != output.shape[1] - 1:
            raise ValueError(f"Vision tokens ({output.shape[1]}) are not a CLS token plus a square patch grid.")
        return output[:, 1:].transpose(1, 2).reshape(output.shape[0], -1, side, side)

    def module_name(self, module: nn.Module) -> str:
        return next(name for name, candidate in self.model.named_modules() if candidate is module)

    def resolve_layer(self, index: int, count: int, what: str) -> int:
        """Accept Python-style negative indices; reject out-of-range ones with a clear message."""
        if not -count <= index < count:
            raise SettingError(f"{what} index {index} is out of range: this model has {count} ({-count}..{count - 1}).")
        return index % count

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """The model's pixel input (1, 3, S, S) for an RGB image, through the model's own image processor."""
        pixels = self.image_processor(images=image, return_tensors="pt").pixel_values
        return pixels.to(self.device, dtype=self.model.dtype)

    def autocast(self, stage: Stage, reused: bool = False) -> AbstractContextManager[None]:
        """Where a pass of `stage` runs in its `precision`: torch's bfloat16 autocast (matrix products and
        convolutions in bfloat16, weights and log-probabilities in float32) or float32. `reused`: the block runs
        the model's weights again and again (generation), so their bfloat16 casts are kept for it: all but the
        vision encoder's blocks, which generation runs once."""
        if not reused:
            return self.precision.autocast(self.device, stage)
        once = {id(weight) for layer in self.vision_layers for weight in layer.parameters()}
        return self.precision.autocast(self.device, stage,
                                       [weight for weight in self.model.parameters() if id(weight) not in once])

    def generate(self, pixel_values: torch.Tensor, options: DecodeOptions = DecodeOptions()) -> list[int]:
        """Generated ids, starting with the decoder's start token and without the end token."""
        return self.generate_scored(pixel_values, options)[0]

    @torch.no_grad()
    def generate_scored(self, pixel_values: torch.Tensor, options: DecodeOptions = DecodeOptions(),
                        streamer: BaseStreamer | None = None) -> tuple[list[int], list[float]]:
        """`generate`, and log p(y_t | image, y_<t) of each generated token (t ≥ 1), from generation's own logits.
        `streamer` (greedy decoding only) is handed the prompt, then each token as it is generated.

        The raw logits of the step (and, in beam search, of the beam) that produced each token are exactly the
        teacher-forced ones, so a caption needs no second forward pass to be scored. `compute_transition_scores`
        picks them along the winning beam; they are log-softmaxed here first, because the scores generation
        ranks beams by have been through its logits processors (suppressed tokens, …), which the word's
        probability under the model must not be.
        """
        start = self.start_ids(pixel_values, options.instruction)
        with self.autocast("caption", reused=True):
            minimum = {} if options.min_new_tokens is None else {"min_new_tokens": options.min_new_tokens}
            output = self.generator.generate(num_beams=options.num_beams, max_new_tokens=options.max_new_tokens,
                                             do_sample=False, return_dict_in_generate=True, output_logits=True,
                                             streamer=streamer, **minimum, **self._generate_inputs(pixel_values, start))
        # The generated tokens are the sequence's last ones (before them: the start tokens, or nothing when the
        # model started from input embeddings); every caption is read as the start tokens followed by them.
        generated = output.sequences[0, output.sequences.shape[1] - len(output.logits):].tolist()
        sequence = start + generated
        end = self._caption_end(sequence)
        steps = [torch.log_softmax(_at_least_float32(logits), dim=-1) for logits in output.logits]
        scores = self.generator.compute_transition_scores(output.sequences, steps,
                                                          getattr(output, "beam_indices", None),
                                                          normalize_logits=False)[0].tolist()
        # The start tokens after the first are given, not written: they get no score of their own.
        return sequence[:end], [0.0] * (len(start) - 1) + scores[: end - len(start)]

    @torch.no_grad()
    def token_logprobs(self, pixel_values: torch.Tensor, token_ids: list[int]) -> list[float]:
        """log p(y_t | image, y_<t) for every position t ≥ 1 of `token_ids` (teacher forcing)."""
        return self.batch_token_logprobs(pixel_values, token_ids)[0].tolist()

    @torch.no_grad()
    def batch_token_logprobs(self, pixel_values: torch.Tensor, token_ids: list[int],
                             stage: Stage = "scoring") -> torch.Tensor:
        """`token_logprobs` for each image of a batch (B, 3, S, S) at once: (B, T−1) float32 or float64.

        Perturbation methods score one caption on many altered images; one batched forward costs far less
        than as many single ones. `stage`: which precision stage the pass belongs to (`ipag.precision`).
        """
        return self.differentiable_token_logprobs(pixel_values, token_ids, stage)

    def differentiable_token_logprobs(self, pixel_values: torch.Tensor, token_ids: Sequence[int],
                                      stage: Stage = "scoring") -> torch.Tensor:
        """`batch_token_logprobs` inside the autograd graph (for methods that differentiate a batch of
        altered images, like integrated gradients)."""
        ids = torch.tensor([list(token_ids)], device=self.device).expand(pixel_values.shape[0], -1)
        with self.autocast(stage), self._checkpointing():
            logits, _ = self._forward(pixel_values, ids, None)
        return token_logprobs(torch.log_softmax(_at_least_float32(logits), dim=-1), token_ids)

    def forward_for_attribution(self, pixel_values: torch.Tensor, token_ids: list[int], vision_layer: int,
                                cross_attention_layer: int | None, attentions: bool = False) -> DecoderPass:
        """One forward whose pixel input, vision layer output and cross-attention keep their gradients (and, with
        `attentions`, every layer's attention probabilities). `cross_attention_layer` None keeps no
        cross-attention; a captioner without any ignores it."""
        index = self.resolve_layer(vision_layer, len(self.vision_layers), "Vision layer")
        block = self.vision_layers[index]
        layer = None
        if cross_attention_layer is not None and self.num_decoder_layers:
            layer = self.resolve_layer(cross_attention_layer, self.num_decoder_layers, "Cross-attention layer")
        pixel_values = pixel_values.detach().clone().requires_grad_(True)
        ids = torch.tensor([token_ids], device=self.device).expand(pixel_values.shape[0], -1)
        every = None
        with torch.enable_grad(), self.autocast("gradients"), self._checkpointing(), \
                capture_output(block) as captured:
            if attentions:
                logits, every = self._forward_with_attentions(pixel_values, ids)
                # A decoder-only model's self-attention holds its attention to the image tokens.
                to_image = every.decoder_cross or every.decoder_self
                attention = None if layer is None else to_image[layer]
            else:
                logits, attention = self._forward(pixel_values, ids, layer)
        output = captured[0]
        grid = tuple(self.vision_grid(output).shape[-2:])
        keys = attention.shape[-1] if attention is not None else (
            to_image[0].shape[-1] if every is not None and self.num_decoder_layers else None)
        return DecoderPass(
            vision_layer=self.module_name(block),
            attention_layer=None if layer is None else self.attention_name(layer),
            pixel_values=pixel_values,
            logprobs=torch.log_softmax(_at_least_float32(logits), dim=-1),
            vision_output=output,
            cross_attention=attention,
            grid=grid,
            vision_layout=self.vision_layout(pixel_values, index, grid),
            attention_layout=None if keys is None else self.attention_layout(token_ids, keys, grid),
            vision_index=index,
            attentions=every,
        )

    def attention_name(self, layer: int) -> str:
        """What the page calls decoder layer `layer`'s attention to the image."""
        return f"decoder layer {layer} cross-attention"

    def attention_layout(self, token_ids: Sequence[int], keys: int, grid: tuple[int, int]) -> Layout:
        """Where the decoder's `keys` attention keys lie on the pixel input, for the caption `token_ids`: here the
        vision grid's tokens are the last keys (a CLS token may come first)."""
        return Layout.of_grid(*grid, first=keys - grid[0] * grid[1])

    def vision_layout(self, pixel_values: torch.Tensor, index: int, grid: tuple[int, int]) -> Layout:
        """Where the cells of vision layer `index`'s grid lie on `pixel_values`: here one grid over all of it."""
        return Layout.of_grid(*grid)


@contextmanager
def capture_output(module: nn.Module, index: int = 0) -> Iterator[list[torch.Tensor]]:
    """Record `module`'s output during the block (element `index` of an output tuple: 1 is an attention layer's
    probabilities), in this thread only; the hook is removed even on failure.

    Other threads may run the same module meanwhile (another user's caption, say): their outputs must never
    land in this list, or one user's activations could explain another user's word.
    """
    captured: list[torch.Tensor] = []
    owner = threading.get_ident()

    def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor | tuple) -> None:
        if threading.get_ident() == owner:
            captured.append(output[index] if isinstance(output, tuple) else output)

    handle = module.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


@contextmanager
def checkpointed(layers: Sequence[nn.Module]) -> Iterator[None]:
    """Run `layers` under activation checkpointing during the block (this thread's calls only): their forward keeps
    only its inputs, and the backward pass recomputes the rest, so a big language model's backward needs memory for
    one layer's activations instead of all of them. The outputs (attention probabilities among them) stay in the
    graph, so gradients with respect to them are exact. transformers' own switch (`gradient_checkpointing_enable`)
    acts only in training mode, which would also turn on the dropout of some families' layers (OPT, BART) and make
    an explanation random; the teacher-forced passes must not fill a KV cache either (`use_cache=False`), or the
    recomputation would append to it a second time."""
    owner = threading.get_ident()
    originals = [layer.forward for layer in layers]

    def wrap(forward):
        def run(*args, **kwargs):
            if threading.get_ident() != owner or not torch.is_grad_enabled():
                return forward(*args, **kwargs)
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return run

    for layer, forward in zip(layers, originals):
        layer.forward = wrap(forward)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward  # the class's forward again


@contextmanager
def tracked_output(module: nn.Module) -> Iterator[None]:
    """Make `module`'s output part of the autograd graph during the block (in this thread only). The text
    embeddings of a decoder do not depend on the image, so nothing computed from them alone (the first decoder
    layer's self-attention, say) would get a gradient; relevance propagation needs the target's gradient on
    every attention map."""
    owner = threading.get_ident()

    def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if threading.get_ident() != owner or output.requires_grad:
            return None
        return output.detach().requires_grad_(True)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """Log-softmax in float32 even for half-precision models (but keep float64 for exact checks)."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def is_punctuation(text: str) -> bool:
    """True for tokens made only of punctuation characters (they are not words a user can click)."""
    return bool(text) and all(unicodedata.category(char).startswith("P") for char in text)
