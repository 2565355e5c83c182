"""ViLD (Gu et al. 2022): an open-vocabulary two-stage detector distilled from CLIP.

pixels -> backbone (an image tower; its patch grid) (B, C, g, g)
       -> RPN on the grid: class-agnostic objectness + box deltas per anchor -> proposals (NMS)
       -> RoIAlign (layers/roi.py) -> 2 fc -> region embedding (D) + class-agnostic box deltas
ViLD-text:  logits = cos(region, [background, text(base class names)]) / temperature, softmax CE;
            the text embeddings come from the frozen CLIP text tower (prompt ensemble), the
            background embedding is learned (both L2-normalised, as the official head).
ViLD-image: L1 between the normalised region embedding of each proposal and the normalised frozen
            CLIP image embedding of that proposal cropped from the image (computed per batch, with
            RoIAlign on the pixels as the crop-and-resize), weight 0.5 (`feat_distill_weight`).
Box regression: Faster R-CNN deltas, smooth L1, on RoIs with IoU >= 0.5 to a ground-truth box.

At test time any names can be detected: their prompts go through the frozen text tower. Classes
held out of training (the synthetic data's `--holdout`) are never labelled, so finding them is
open-vocabulary transfer from CLIP. Differences from the official ViLD, for a CPU: no FPN and no
mask head, one shared head ('vanilla' distillation, so no text/image ensemble at inference),
a single grid level with square anchors, the image resized to the square whole (no crop).
Recipe vild-tiny starts the backbone, the teacher and the text tower from a CLIP run
(`init_image` / `init_text`).
"""
from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.capabilities import Detects
from vlmkit.encoders.config import TextConfig, VisionConfig, build_text_tower, build_vision_tower
from vlmkit.errors import UserError
from vlmkit.layers.roi import box_iou, decode_boxes, encode_boxes, nms, roi_align
from vlmkit.models.base import ModelOutput, VLModel, detached_logs
from vlmkit.models.registry import register_config, register_family

RPN_WEIGHTS = (1.0, 1.0, 1.0, 1.0)  # Faster R-CNN's RPN delta weights
BAD_BOXES = "box outside the image, of zero area or malformed"  # a training skip reason


@dataclass
class ViLDConfig:
    embed_dim: int = 128
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    classes: tuple[str, ...] = ()  # the base classes trained on (set from the training records)
    prompts: tuple[str, ...] = ("a photo of a {}.", "a {}.")  # prompt ensemble for class names
    anchor_sizes: tuple[float, ...] = (0.15, 0.25, 0.4)  # square anchors, as fractions of the image side
    roi_size: int = 4  # RoIAlign output side on the grid
    head_width: int = 256
    train_proposals: int = 16  # proposals per image trained on (with the ground-truth boxes)
    test_proposals: int = 32
    distill_proposals: int = 4  # proposals per image distilled towards CLIP crop embeddings
    temperature: float = 0.01  # the official 1/100
    max_detections: int = 100

    def __post_init__(self) -> None:
        if not 0 < self.temperature:
            raise UserError(f"temperature must be positive, got {self.temperature}")
        if not self.anchor_sizes or any(not 0 < size <= 1 for size in self.anchor_sizes):
            raise UserError(f"anchor_sizes must be fractions in (0, 1], got {list(self.anchor_sizes)}")
        if not self.prompts or any("{}" not in prompt for prompt in self.prompts):
            raise UserError("every prompt of 'prompts' needs a '{}' where the class name goes")


@dataclass
class ViLDTraining:
    """The recipe's `training:` options of ViLD."""

    distill_weight: float = 0.5  # the official feat_distill_weight
    rpn_weight: float = 1.0
    box_weight: float = 1.0


def _smooth_l1_sum(predicted: torch.Tensor, target: torch.Tensor, beta: float) -> torch.Tensor:
    return F.smooth_l1_loss(predicted, target, beta=beta, reduction="sum")


@register_family
class ViLD(VLModel):
    family = "vild"
    config_class = ViLDConfig
    training_class = ViLDTraining
    capabilities = (Detects,)
    towers = {"image": "visual", "text": "text"}
    uses_every_parameter = True
    example_config = {"classes": ["red circle", "blue square", "green triangle"]}

    def __init__(self, config: ViLDConfig) -> None:
        super().__init__(config)
        if config.vision.type != "vit":
            raise UserError("vild needs a ViT image tower (its patch grid feeds the RPN); set model.vision.type=vit")
        self.visual = build_vision_tower(config.vision, config.embed_dim)  # the backbone (trained)
        self.teacher = build_vision_tower(config.vision, config.embed_dim)  # frozen CLIP image tower
        self.text = build_text_tower(config.text, config.embed_dim)  # frozen CLIP text tower
        width, anchors, head = config.vision.width, len(config.anchor_sizes), config.head_width
        self.rpn_conv = nn.Conv2d(width, width, 3, padding=1)
        self.rpn_objectness = nn.Conv2d(width, anchors, 1)
        self.rpn_deltas = nn.Conv2d(width, anchors * 4, 1)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(width * config.roi_size ** 2, head), nn.ReLU(),
                                  nn.Linear(head, head), nn.ReLU())
        self.project = nn.Linear(head, config.embed_dim)  # the official project-to-clip
        self.box_deltas = nn.Linear(head, 4)  # class-agnostic
        self.background = nn.Parameter(torch.randn(config.embed_dim) * 0.01)
        self.after_pretrained_towers()
        # The backbone's pooling head makes CLIP's image embedding; the detector reads the grid only.
        for module in (self.visual.proj, self.visual.norm_post):
            module.requires_grad_(False)

    def after_pretrained_towers(self) -> None:
        """The teacher is the CLIP image tower the backbone starts from, frozen; the text tower is frozen."""
        self.teacher.load_state_dict(self.visual.state_dict())
        self.teacher.requires_grad_(False)
        self.text.requires_grad_(False)

    def train(self, mode: bool = True) -> "ViLD":
        super().train(mode)
        self.teacher.eval()  # frozen towers keep eval behaviour (dropout off)
        self.text.eval()
        return self

    # ---- pieces --------------------------------------------------------------------------
    def grid(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, C, g, g) patch features of the backbone."""
        tokens = self.visual(pixels).tokens[:, 1:]  # (B, g*g, C) without [CLS]
        side = int(round(tokens.shape[1] ** 0.5))
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, side, side)

    def anchors(self, grid_side: int, image_side: int, device) -> torch.Tensor:
        """(g*g*A, 4) square anchors centred on the grid cells, in the order (row, column, size)."""
        stride = image_side / grid_side
        centres = (torch.arange(grid_side, device=device, dtype=torch.float32) + 0.5) * stride
        cy, cx = torch.meshgrid(centres, centres, indexing="ij")  # (g, g)
        half = torch.tensor(self.config.anchor_sizes, device=device) * image_side / 2  # (A,)
        cx, cy, half = cx[..., None], cy[..., None], half[None, None]
        return torch.stack([cx - half, cy - half, cx + half, cy + half], dim=-1).reshape(-1, 4)

    def rpn(self, grid: torch.Tensor):
        """(B, C, g, g) -> objectness logits (B, N) and deltas (B, N, 4), N = g*g*A in anchor order."""
        hidden = F.relu(self.rpn_conv(grid))
        batch, _, side, _ = grid.shape
        objectness = self.rpn_objectness(hidden).permute(0, 2, 3, 1).reshape(batch, -1)  # (B, N)
        deltas = self.rpn_deltas(hidden).view(batch, -1, 4, side, side).permute(0, 3, 4, 1, 2).reshape(batch, -1, 4)
        return objectness, deltas

    def proposals(self, anchors, objectness, deltas, image_side: int, count: int) -> list[torch.Tensor]:
        """Per image: up to `count` decoded, clipped, non-maximum-suppressed anchor boxes (K, 4), no gradient."""
        result = []
        for scores, moves in zip(objectness.detach(), deltas.detach()):
            boxes = decode_boxes(anchors, moves, RPN_WEIGHTS).clamp(0, image_side)
            valid = ((boxes[:, 2] - boxes[:, 0]) > 1) & ((boxes[:, 3] - boxes[:, 1]) > 1)
            boxes, scores = boxes[valid], scores[valid]
            top = scores.topk(min(len(scores), 4 * count)).indices
            kept = nms(boxes[top], scores[top], 0.7)[:count]
            result.append(boxes[top][kept])
        return result

    def regions(self, grid: torch.Tensor, boxes: list[torch.Tensor], image_side: int):
        """RoI features of per-image boxes -> (normalised region embeddings (K, D), box deltas (K, 4))."""
        batch_index = torch.cat([torch.full((len(b),), i, device=grid.device, dtype=torch.long)
                                 for i, b in enumerate(boxes)])
        pooled = roi_align(grid, torch.cat(boxes), batch_index, self.config.roi_size,
                           spatial_scale=grid.shape[-1] / image_side)  # (K, C, r, r)
        hidden = self.head(pooled)  # (K, head)
        return F.normalize(self.project(hidden), dim=-1), self.box_deltas(hidden)

    def class_prompts(self, names: Sequence[str]) -> list[str]:
        """Every prompt of the ensemble for every name, name-major (C * P texts)."""
        return [prompt.format(name) for name in names for prompt in self.config.prompts]

    def class_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        """(C * P, L) tokens of `class_prompts` -> (C, D) normalised frozen text embeddings, averaged
        over the prompt ensemble."""
        with torch.no_grad():
            embeddings = F.normalize(self.text(tokens.to(self.device)).pooled, dim=-1)  # (C * P, D)
        embeddings = embeddings.view(-1, len(self.config.prompts), embeddings.shape[-1]).mean(dim=1)  # (C, D)
        return F.normalize(embeddings, dim=-1)

    def classify(self, regions: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(K, D) regions, (C, D) class embeddings -> (K, 1 + C) logits, background first."""
        classifier = torch.cat([F.normalize(self.background, dim=0)[None], text])  # (1 + C, D)
        return regions @ classifier.t() / self.config.temperature

    # ---- training -------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        pixels, gt_boxes, gt_labels = batch["pixels"], batch["boxes"], batch["labels"]  # (B,3,S,S) (B,M,4) (B,M)
        # batch["class_tokens"]: (C * P, L) the base classes' prompts, tokenized by the dataset
        side = pixels.shape[-1]
        options = self.training_options
        grid = self.grid(pixels)  # (B, C, g, g)
        anchors = self.anchors(grid.shape[-1], side, pixels.device)  # (N, 4)
        objectness, deltas = self.rpn(grid)  # (B, N), (B, N, 4)

        # RPN: anchors with IoU >= 0.5 (and each box's best anchor) are objects, < 0.3 background
        rpn_cls, rpn_box, rpn_count, positives_total = [], [], 0, 0
        for b in range(len(pixels)):
            boxes = gt_boxes[b][gt_labels[b] >= 0]  # (M_b, 4)
            target = torch.zeros(len(anchors), device=pixels.device)
            weight = torch.ones(len(anchors), device=pixels.device)
            if len(boxes):
                iou = box_iou(anchors, boxes)  # (N, M_b)
                best, match = iou.max(dim=1)
                target[best >= 0.5] = 1
                target[iou.argmax(dim=0)] = 1
                weight[(best >= 0.3) & (target == 0)] = 0  # neither object nor background
                positive = target == 1
                rpn_box.append(_smooth_l1_sum(deltas[b][positive],
                                              encode_boxes(anchors[positive], boxes[match[positive]], RPN_WEIGHTS), 1 / 9))
                positives_total += int(positive.sum())
            rpn_cls.append(F.binary_cross_entropy_with_logits(objectness[b], target, weight=weight, reduction="sum"))
            rpn_count += int(weight.sum())
        rpn_loss = torch.stack(rpn_cls).sum() / max(rpn_count, 1)
        rpn_box_loss = (torch.stack(rpn_box).sum() if rpn_box else deltas.sum() * 0) / max(positives_total, 1)

        # Second stage on proposals + ground-truth boxes
        proposals = self.proposals(anchors, objectness, deltas, side, self.config.train_proposals)
        rois, roi_labels, roi_targets = [], [], []
        for b, found in enumerate(proposals):
            valid = gt_labels[b] >= 0
            boxes, labels = gt_boxes[b][valid], gt_labels[b][valid]
            candidates = torch.cat([found, boxes])
            label = torch.zeros(len(candidates), dtype=torch.long, device=pixels.device)  # 0 = background
            target = candidates.clone()
            if len(boxes):
                best, match = box_iou(candidates, boxes).max(dim=1)
                label = torch.where(best >= 0.5, labels[match] + 1, label)
                target = boxes[match]
            rois.append(candidates)
            roi_labels.append(label)
            roi_targets.append(target)
        regions, box_deltas = self.regions(grid, rois, side)  # (K, D), (K, 4)
        labels = torch.cat(roi_labels)
        text_logits = self.classify(regions, self.class_embeddings(batch["class_tokens"]))  # (K, 1 + C)
        text_loss = F.cross_entropy(text_logits, labels)
        foreground = labels > 0
        box_loss = _smooth_l1_sum(box_deltas[foreground], encode_boxes(torch.cat(rois)[foreground],
                                                                       torch.cat(roi_targets)[foreground]), 1.0)
        box_loss = box_loss / max(int(foreground.sum()), 1)

        # ViLD-image: the first proposals of each image towards CLIP's embedding of their crops
        distilled = [found[:self.config.distill_proposals] for found in proposals]
        crop_index = torch.cat([torch.full((len(f),), i, device=pixels.device, dtype=torch.long)
                                for i, f in enumerate(distilled)])
        if len(crop_index):
            with torch.no_grad():
                crops = roi_align(pixels, torch.cat(distilled), crop_index, self.config.vision.image_size,
                                  sampling_ratio=1)  # (R, 3, S, S) crop-and-resize
                teacher = F.normalize(self.teacher(crops).pooled, dim=-1)  # (R, D)
            student, _ = self.regions(grid, distilled, side)
            distill_loss = (student - teacher).abs().sum(dim=-1).mean()
        else:
            distill_loss = regions.sum() * 0
        loss = (text_loss + options.box_weight * box_loss + options.rpn_weight * (rpn_loss + rpn_box_loss)
                + options.distill_weight * distill_loss)
        accuracy = (text_logits.argmax(dim=-1) == labels).float().mean()
        return ModelOutput(loss=loss, logs=detached_logs(loss=loss, text=text_loss, distill=distill_loss, box=box_loss,
                                                         rpn=rpn_loss + rpn_box_loss, roi_acc=accuracy))

    # ---- detection ------------------------------------------------------------------------
    def detection_inputs(self, images: Sequence) -> torch.Tensor:
        """PIL images -> (B, 3, S, S): each resized to the square whole (bicubic) and normalised."""
        return torch.stack([_square_pixels(image, self.config.vision.image_size, self.transform) for image in images])

    @torch.no_grad()
    def detect(self, pixels: torch.Tensor, labels: Sequence[str]) -> list[dict[str, torch.Tensor]]:
        """Boxes, scores and label indices per image, among `labels` (any names: open vocabulary)."""
        if not labels:
            raise UserError("detect needs at least one label to look for; give --labels")
        was_training = self.training
        self.eval()
        try:
            pixels = pixels.to(self.device)
            side = pixels.shape[-1]
            grid = self.grid(pixels)
            anchors = self.anchors(grid.shape[-1], side, pixels.device)
            objectness, deltas = self.rpn(grid)
            proposals = self.proposals(anchors, objectness, deltas, side, self.config.test_proposals)
            text = self.class_embeddings(self.tokenize(self.class_prompts(list(labels))))  # (C, D)
            results = []
            for index, found in enumerate(proposals):
                if not len(found):
                    results.append({"boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
                                    "labels": torch.zeros(0, dtype=torch.long)})
                    continue
                regions, moves = self.regions(grid[index:index + 1], [found], side)
                probabilities = self.classify(regions, text).softmax(dim=-1)[:, 1:]  # (K, C) without background
                boxes = decode_boxes(found, moves).clamp(0, side)  # (K, 4)
                scores, classes = probabilities.flatten(), torch.arange(len(labels), device=pixels.device).repeat(len(found))
                boxes = boxes.repeat_interleave(len(labels), dim=0)  # (K*C, 4), one row per (box, class)
                keep = scores > 0.001
                boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
                # per-class NMS: boxes of different classes are moved apart so they never suppress each other
                kept = nms(boxes + classes[:, None] * (2 * side + 1), scores, 0.5)[:self.config.max_detections]
                results.append({"boxes": boxes[kept].cpu(), "scores": scores[kept].cpu(), "labels": classes[kept].cpu()})
            return results
        finally:
            self.train(was_training)

    # ---- data -----------------------------------------------------------------------------
    @classmethod
    def adapt_config_to_data(cls, config: dict, records: list[dict]) -> dict:
        """The base classes are the object names of the training records (held-out ones never appear)."""
        names = sorted({obj["name"] for record in records for obj in record.get("objects") or []
                        if isinstance(obj, dict) and isinstance(obj.get("name"), str)})
        if not names:
            raise UserError("no training record has 'objects' ([{name, box}]), which the 'vild' family trains on; "
                            "give detection records (vlmkit data synth writes them)")
        config["classes"] = names
        return config

    def training_dataset(self, records: list[dict], transform, tokenizer, seed: int, caption: str = "random"):
        records = [record for record in records if "objects" in record and record.get("image")]
        if not records:
            raise UserError("no training record has an image and 'objects', which the 'vild' family trains on")
        class_tokens = torch.as_tensor(tokenizer(self.class_prompts(self.config.classes)), dtype=torch.long)
        return DetectionDataset(records, self.config.vision.image_size, transform, list(self.config.classes),
                                class_tokens)

    def dummy_batch(self, batch_size: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
        from vlmkit.encoders.lm import random_texts

        generator = torch.Generator().manual_seed(seed)
        side = self.config.vision.image_size
        corners = torch.rand(batch_size, 2, 2, generator=generator) * side * 0.5  # (B, M, 2)
        sizes = 0.2 * side + torch.rand(batch_size, 2, 1, generator=generator) * side * 0.3
        boxes = torch.cat([corners, corners + sizes], dim=-1)  # (B, 2, 4) squares inside the image
        labels = torch.randint(0, len(self.config.classes), (batch_size, 2), generator=generator)
        labels[0, 1] = -1  # padding
        return {"pixels": torch.randn(batch_size, 3, side, side, generator=generator), "boxes": boxes, "labels": labels,
                "class_tokens": random_texts(self.config.text, len(self.config.classes) * len(self.config.prompts),
                                             generator)}


def _square_pixels(image, side: int, transform) -> torch.Tensor:
    """A PIL image resized to side x side (no crop, so boxes scale linearly), normalised with the
    transform's mean and std (CLIP's when there is none)."""
    import numpy as np
    from PIL import Image

    mean = getattr(transform, "mean", (0.48145466, 0.4578275, 0.40821073))
    std = getattr(transform, "std", (0.26862954, 0.26130258, 0.27577711))
    resized = image.convert("RGB").resize((side, side), Image.BICUBIC)
    array = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, S, S)
    return (array - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


class DetectionDataset(torch.utils.data.Dataset):
    """Images resized to the square with their boxes scaled alike; a record whose image cannot be read
    or whose boxes are outside the image or of zero area is skipped and counted (the trainer reports it)."""

    def __init__(self, records: list[dict], side: int, transform, classes: list[str], class_tokens: torch.Tensor):
        self.records, self.side, self.transform, self.classes = records, side, transform, classes
        self.class_tokens = class_tokens  # (C * P, L): the same in every batch
        self._pending: list[tuple[str, str]] = []  # (image, reason) of this process's skips not yet collated

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """No augmentation: every epoch sees the same samples."""

    def __getitem__(self, index: int) -> dict | None:
        from vlmkit.data.formats import CorruptImage, load_image
        from vlmkit.data.objects import check_objects

        record = self.records[index]
        try:
            image = load_image(record["image"])
        except CorruptImage:
            self._pending.append((record["image"], "unreadable image"))
            return None
        if check_objects(record, image.size) is not None:
            self._pending.append((record["image"], BAD_BOXES))
            return None
        width, height = image.size
        scale = torch.tensor([self.side / width, self.side / height] * 2)
        objects = [obj for obj in record["objects"] if obj["name"] in self.classes]
        boxes = torch.tensor([obj["box"] for obj in objects], dtype=torch.float32).reshape(-1, 4) * scale
        labels = torch.tensor([self.classes.index(obj["name"]) for obj in objects], dtype=torch.long)
        return {"pixels": _square_pixels(image, self.side, self.transform), "boxes": boxes, "labels": labels}

    def collate(self, samples: list[dict | None]) -> dict:
        good = [sample for sample in samples if sample is not None]
        most = max([len(sample["labels"]) for sample in good] + [1])
        boxes = torch.zeros(len(good), most, 4)
        labels = torch.full((len(good), most), -1, dtype=torch.long)  # -1 = padding
        for row, sample in enumerate(good):
            boxes[row, :len(sample["labels"])] = sample["boxes"]
            labels[row, :len(sample["labels"])] = sample["labels"]
        pixels = torch.stack([s["pixels"] for s in good]) if good else torch.zeros(0, 3, self.side, self.side)
        skipped, self._pending = self._pending, []
        return {"pixels": pixels, "boxes": boxes, "labels": labels, "num_skipped": len(samples) - len(good),
                "skipped": [image for image, _ in skipped], "class_tokens": self.class_tokens,
                "skip_reasons": {reason: sum(r == reason for _, r in skipped) for reason in {r for _, r in skipped}}}


register_config("vild-tiny", "vild", tiny=True, config={
    # clip-tiny's towers (64 px ViT, patch 8: an 8x8 grid) so a clip-tiny run initialises it.
    "embed_dim": 128,
    "vision": {"type": "vit", "image_size": 64, "patch_size": 8, "width": 128, "depth": 4, "heads": 4},
    "text": {"width": 128, "depth": 3, "heads": 4, "context_length": 32, "vocab_size": 1024, "eos_token_id": 1023},
})
