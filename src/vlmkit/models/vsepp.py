"""VSE++ (Faghri et al. 2018): a visual-semantic embedding trained with a hinge ranking loss on hard negatives.

image -> vision tower -> (B, D)      text -> text tower -> (B, D)
s(i, j) = cos(image i, text j)
loss = sum_i max_{j != i} [m - s(i, i) + s(i, j)]_+ + max_{j != i} [m - s(i, i) + s(j, i)]_+
(the "max of hinges": only the hardest negative in the batch counts; `hardest: false` sums all of
them, the paper's VSE0 baseline; `hardest_after: N` sums them for the first N updates, then takes the
hardest, the warm-up towers trained from random weights need: from the first step the hardest negative
alone collapses to a loss of 2 x batch x margin). Unlike CLIP there is no temperature and no softmax over the batch:
a pair stops contributing once it beats its hardest negative by the margin. The paper uses a GRU
over word embeddings; here the text side is any vlmkit text tower. Under torchrun each process
ranks within its own micro-batch, as VSE++'s single-GPU training did.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlmkit.capabilities import EmbedsImages, EmbedsTexts
from vlmkit.encoders.config import TextConfig, VisionConfig, build_text_tower, build_vision_tower
from vlmkit.errors import UserError
from vlmkit.layers.update_counter import UpdateCounter
from vlmkit.losses import hinge_triplet_loss, matching_accuracy
from vlmkit.models.base import ModelOutput, VLModel, detached_logs
from vlmkit.models.registry import register_config, register_family


@dataclass
class VSEConfig:
    embed_dim: int = 1024  # the paper's joint space
    vision: VisionConfig = field(default_factory=lambda: VisionConfig(type="resnet", width=64, heads=32))
    text: TextConfig = field(default_factory=TextConfig)


@dataclass
class VSETraining:
    """The recipe's `training:` options of VSE++."""

    margin: float = 0.2  # the paper's alpha
    hardest: bool = True  # max of hinges (VSE++); false = sum over all negatives (VSE0)
    # updates on summed negatives (VSE0) before the hardest only: VSE++'s warm-up for towers that start
    # from random weights, where the hardest negative alone collapses (0 = hardest from the start)
    hardest_after: int = 0

    def __post_init__(self) -> None:
        if self.margin < 0:
            raise UserError(f"training.margin must be 0 or more, got {self.margin}")
        if self.hardest_after < 0:
            raise UserError(f"training.hardest_after must be 0 or more, got {self.hardest_after}")


@register_family
class VSEPlusPlus(VLModel):
    family = "vsepp"
    config_class = VSEConfig
    training_class = VSETraining
    capabilities = (EmbedsImages, EmbedsTexts)
    towers = {"image": "visual", "text": "text"}
    uses_every_parameter = True

    def __init__(self, config: VSEConfig) -> None:
        super().__init__(config)
        self.visual = build_vision_tower(config.vision, config.embed_dim)
        self.text = build_text_tower(config.text, config.embed_dim)
        self.updates = UpdateCounter()  # saved with the weights: a resumed run keeps its place in `hardest_after`

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D), not normalised."""
        return self.visual(pixels).pooled

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) -> (B, D), not normalised."""
        return self.text(tokens).pooled

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        image = self.encode_image(batch["pixels"])  # (B, D)
        text = self.encode_text(batch["tokens"])  # (B, D)
        options = self.training_options
        hardest = options.hardest and self.updates.reached(options.hardest_after)
        loss, scores = hinge_triplet_loss(image, text, margin=options.margin, hardest=hardest)  # (), (B, B)
        return ModelOutput(loss=loss, logs=detached_logs(loss=loss, i2t_acc=matching_accuracy(scores),
                                                         hardest=scores.new_tensor(float(hardest))))

    def after_optimizer_step(self) -> None:
        self.updates.step()

    def dummy_batch(self, batch_size: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
        from vlmkit.encoders.lm import random_texts

        generator = torch.Generator().manual_seed(seed)
        vision = self.config.vision
        return {"pixels": torch.randn(batch_size, 3, vision.image_size, vision.image_size, generator=generator),
                "tokens": random_texts(self.config.text, batch_size, generator)}


register_config("vsepp-tiny", "vsepp", tiny=True, config={
    # CLIP's modified ResNet at 64 px and a 3-block causal text tower, joint space of 128.
    "embed_dim": 128,
    "vision": {"type": "resnet", "image_size": 64, "width": 32, "heads": 4, "resnet_layers": [1, 1, 1, 1]},
    "text": {"width": 128, "depth": 3, "heads": 4, "context_length": 32, "vocab_size": 1024, "eos_token_id": 1023},
})
register_config("vsepp-rn50", "vsepp", {
    # The paper's image side (ResNet, 1024-d joint space) with a CLIP-sized text tower in place of its GRU.
    "embed_dim": 1024,
    "vision": {"type": "resnet", "image_size": 224, "width": 64, "heads": 32, "resnet_layers": [3, 4, 6, 3]},
    "text": {"width": 512, "depth": 12, "heads": 8},
})
