"""The SigLIP 2 recipe inside `siglip train` (`--decoder-weight`, `--siglip2-from`): what it adds to a run.

    Sample -> RecipeTransform: the pair's tensors and the decoder's targets (caption, referring expression, grounded
        caption; drawn from (seed, sample key), so a resumed run and any number of workers draw alike)
    -> Recipe.inputs (once per batch, before the step): from the switch-on step on, the teacher's targets (no graph)
        and this rank's rows of the global batch's local crops and patch masks
    -> Siglip2Towers (inside DistributedDataParallel): the towers and the added losses of siglip.siglip2.recipe,
        from one pass of the image tower
    -> after the update: the EMA teacher moves (Recipe.after_update)

The teacher is created at the switch-on step as a copy of the student's tower and heads; the heads and the mask
token have been in the optimiser from the start but received no gradient before, so they start as initialised and
with no optimiser state, as the paper's "initializing ... the remaining additional parameters (heads, mask token
and corresponding optimizer parameters) randomly". The decoder, the heads, the teacher and the centres are saved in
every checkpoint (keys "siglip2.*" of its model state) and resume bitwise; the decoder is exported beside final/.
"""

from __future__ import annotations

import random
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from siglip.errors import UserError
from siglip.siglip2.boxes import (
    DecoderVocabulary,
    TextEncoder,
    location_bins,
    longest_target,
    sample_targets,
    stack_targets,
    tokenizer_vocabulary,
)
from siglip.siglip2.decoder import LocCaDecoder, paper_decoder_config
from siglip.siglip2.distill import EmaTeacher, heads_for, switch_on_step
from siglip.siglip2.recipe import (
    RecipeWeights,
    Siglip2Parts,
    crops_of,
    draw_views,
    local_crop_side,
    student_losses,
    teacher_targets,
)
from siglip.siglip2.vision import image_tokens
from siglip.train.config import TrainConfig
from siglip.train.step import ContrastiveTowers, PairTransform

STATE_PREFIX = "siglip2."
"""Keys of the recipe's tensors in a checkpoint's model state."""


def recipe_enabled(config: TrainConfig) -> bool:
    return config.decoder_weight > 0 or config.siglip2_from is not None


class RecipeTransform(PairTransform):
    """PairTransform's tensors, and the decoder's targets: "decoder_tokens" and "decoder_scored", (3, T) each."""

    def __init__(self, processor: Any, seed: int, text_length: int, vocab: DecoderVocabulary):
        super().__init__(processor)
        self.vocab = vocab
        self.encode = TextEncoder(processor.tokenizer, text_length)
        self.seed, self.target_length = seed, longest_target(text_length)

    def __call__(self, sample: Any) -> dict[str, torch.Tensor]:
        tensors = super().__call__(sample)
        rng = random.Random(f"siglip2/{self.seed}/{sample.key}")
        targets = sample_targets(self.vocab, sample.caption, sample.regions, sample.image.size, self.encode, rng)
        tokens, scored = stack_targets([targets], self.target_length, self.vocab.pad_id)
        return {**tensors, "decoder_tokens": tokens[0], "decoder_scored": scored[0]}


class Siglip2Towers(ContrastiveTowers):
    """The towers, and the recipe's added losses computed from the same pass of the image tower.

    forward(pixel_values, input_ids, None, recipe_inputs) -> (image, text, t, b, {term: weighted sum}); without
    recipe_inputs (the first, graph-free pass of micro-batching) the contrastive outputs alone. The image embedding
    is the normalised pooled output of that pass, the same function as siglip.model.encode_images.
    """

    def __init__(self, model: nn.Module, parts: Siglip2Parts, weights: RecipeWeights):
        super().__init__(model, lock_image=False)
        self.parts, self.weights = parts, weights

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, image_features: torch.Tensor | None = None,
                recipe_inputs: dict[str, torch.Tensor] | None = None):
        from siglip.model import encode_texts, scale_and_bias

        if image_features is not None:
            raise ValueError("the SigLIP 2 recipe trains the image tower: it takes pixels, not cached features")
        patch_tokens, pooled = image_tokens(self.model.vision_model, pixel_values)
        outputs = (F.normalize(pooled, dim=-1), encode_texts(self.model, input_ids), *scale_and_bias(self.model))
        if recipe_inputs is None:
            return outputs
        terms = student_losses(self.parts, self.model.vision_model, pixel_values, patch_tokens, recipe_inputs,
                               self.weights)
        return (*outputs, terms)


class Recipe:
    """The recipe's state in one process of a run: its parts, the teacher, the centres, and the switch-on step."""

    def __init__(self, config: TrainConfig, model: nn.Module, processor: Any, device: torch.device):
        from siglip.model import is_naflex
        from siglip.tokenizer import text_length

        if is_naflex(model):
            raise UserError("--decoder-weight and --siglip2-from need a fixed-resolution SigLIP model; a NaFlex "
                            "model is not supported (SigLIP 2 trains NaFlex without them too); choose --model tiny, "
                            "small or base, or --init a fixed-resolution checkpoint")
        self.config, self.model, self.device = config, model, device
        vision = model.config.vision_config
        self.image_size, self.patch_size = int(vision.image_size), int(vision.patch_size)
        self.text_length = text_length(processor.tokenizer)
        self.target_length = longest_target(self.text_length)
        self.weights = RecipeWeights(decoder=config.decoder_weight, distillation=config.distillation_weight)
        self.switch_on = (switch_on_step(config.steps, config.siglip2_from) if config.siglip2_from is not None
                          else None)
        self.vocab = tokenizer_vocabulary(processor.tokenizer, location_bins(model))
        # Built from their own seed: the towers' initial weights (and the global random stream) are those of a
        # run without the recipe, so a plain SigLIP run and a recipe run of one seed start from the same towers.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed + 0x51C2)
            decoder = (LocCaDecoder(paper_decoder_config(self.vocab, model.config.text_config, int(vision.hidden_size),
                                                         self.target_length))
                       if config.decoder_weight > 0 else None)
            heads = heads_for(int(vision.hidden_size)) if self.switch_on is not None else None
        self.parts = Siglip2Parts(decoder, heads).to(device)
        self.teacher: EmaTeacher | None = None
        self.centers = ({"global": torch.zeros(heads.global_head.prototypes.shape[0], device=device),
                         "patch": torch.zeros(heads.patch_head.prototypes.shape[0], device=device)}
                        if heads is not None else {})

    # ---- wiring

    def transform(self, processor: Any) -> PairTransform:
        if self.parts.decoder is None:
            return PairTransform(processor)
        return RecipeTransform(processor, self.config.seed, self.text_length, self.vocab)

    def towers(self) -> Siglip2Towers:
        return Siglip2Towers(self.model, self.parts, self.weights)

    def trained(self) -> nn.Module:
        """The model and the parts as one module: what the optimiser, clipping and the checks see."""
        return nn.ModuleDict({"model": self.model, "siglip2": self.parts})

    def student(self) -> nn.ModuleDict:
        return nn.ModuleDict({"vision": self.model.vision_model, "heads": self.parts.heads})

    def active(self, step: int) -> bool:
        """Whether step `step` (from 0) trains with the teacher."""
        return self.switch_on is not None and step >= self.switch_on

    # ---- each step

    def inputs(self, step: int, tensors: dict[str, torch.Tensor], pixel_values: torch.Tensor, *, rank: int,
               chunk: int | None, autocast_dtype: torch.dtype | None, group: Any) -> dict[str, torch.Tensor]:
        """This rank's recipe inputs for step `step` (per image, sliced with the batch by the step): the decoder's
        targets, and from the switch-on step the crops, masks and teacher targets. A collective from the switch-on
        step on (the centres are all-reduced)."""
        inputs = {}
        if self.parts.decoder is not None:
            inputs["decoder_tokens"] = tensors["decoder_tokens"].to(self.device, non_blocking=True)
            inputs["decoder_scored"] = tensors["decoder_scored"].to(self.device, non_blocking=True)
        if self.active(step):
            if self.teacher is None:
                self.teacher = EmaTeacher(self.student()).eval()
            local = pixel_values.shape[0]
            boxes, masks = draw_views(self.config.seed, step, self.config.batch_size, self.image_size,
                                      self.patch_size, slice(rank * local, (rank + 1) * local))
            global_targets, patch_targets, self.centers = teacher_targets(
                self.teacher, pixel_values, self.centers, chunk=chunk, autocast_dtype=autocast_dtype, group=group)
            inputs.update(crops=crops_of(pixel_values, boxes, local_crop_side(self.image_size, self.patch_size)),
                          global_targets=global_targets, patch_mask=masks.to(self.device),
                          patch_targets=patch_targets)
        return inputs

    def after_update(self, step: int, applied: bool) -> None:
        """Move the teacher towards the student after an update of step `step` that was applied."""
        if applied and self.teacher is not None and self.active(step):
            self.teacher.update(self.student(), self.config.ema_decay)

    # ---- checkpoints and export

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The recipe's tensors for a checkpoint's model state, under "siglip2.": parts, teacher, centres."""
        state = {f"{STATE_PREFIX}parts.{name}": value for name, value in self.parts.state_dict().items()}
        if self.teacher is not None:
            state.update({f"{STATE_PREFIX}teacher.{name}": value for name, value in self.teacher.state_dict().items()})
            state.update({f"{STATE_PREFIX}center.{name}": value for name, value in self.centers.items()})
        return state

    def load_state(self, model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Restore the recipe from a checkpoint's model state; returns the rest, the SigLIP model's own state."""
        mine = {name[len(STATE_PREFIX):]: value for name, value in model_state.items() if name.startswith(STATE_PREFIX)}
        rest = {name: value for name, value in model_state.items() if not name.startswith(STATE_PREFIX)}
        self.parts.load_state_dict(_under(mine, "parts."))
        teacher = _under(mine, "teacher.")
        if teacher:
            self.teacher = EmaTeacher(self.student()).eval()
            self.teacher.load_state_dict(teacher)
            self.centers = {name: value.to(self.device) for name, value in _under(mine, "center.").items()}
        return rest

    def export(self, out: Any) -> None:
        """The decoder beside final/ (DIR/decoder), when the run trained one."""
        from siglip.siglip2.decoder_files import DECODER_DIRECTORY, save_decoder

        if self.parts.decoder is not None:
            save_decoder(self.parts.decoder, self.vocab, self.text_length, out / DECODER_DIRECTORY)


def mean_over_ranks(terms: dict[str, float], world_size: int, device: torch.device) -> dict[str, float]:
    """Each rank's loss parts (its share over its local batch) -> their means over the ranks: the global batch's. A
    collective under torchrun (every rank calls it at the same steps)."""
    if world_size == 1 or not terms:
        return dict(terms)
    import torch.distributed as dist

    names = sorted(terms)
    values = torch.tensor([terms[name] for name in names], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    return {name: float(value) / world_size for name, value in zip(names, values.tolist(), strict=True)}


def _under(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {name[len(prefix):]: value for name, value in state.items() if name.startswith(prefix)}
