"""Reconstruction error of an image autoencoder (a discrete VAE): `vlmkit eval reconstruction`.

Each image goes through the model's own preprocessing, is reconstructed (`Reconstructs`) and
compared, in [0, 1] pixels, with the image the model was shown: mean squared error, mean absolute
error and PSNR (10 log10(1 / MSE), from the MSE over all pixels). As a yardstick the result also
gives the MSE of the dataset's mean colour per channel (what a model that learnt nothing of the
scenes would score).
"""
from __future__ import annotations

import math

import torch

from vlmkit.capabilities import Reconstructs
from vlmkit.errors import UserError


@torch.no_grad()
def evaluate_reconstruction(model, records: list[dict], batch_size: int = 64) -> dict:
    """{"mse", "mae", "psnr", "mean_colour_mse", "images"} of `model` on the images of `records`."""
    from vlmkit.data.formats import load_image

    model.require(Reconstructs, task="eval reconstruction")
    paths = [record["image"] for record in records if record.get("image")]
    if not paths:
        raise UserError("the data holds no image to reconstruct; give records with an 'image' field")
    was_training = model.training
    model.eval()
    squared, absolute, count = 0.0, 0.0, 0
    channel_sum, channel_squares = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    try:
        for start in range(0, len(paths), batch_size):
            pixels = model.preprocess([load_image(path) for path in paths[start : start + batch_size]]).to(model.device)
            target = model.unit_pixels(pixels).double()  # (B, 3, H, W) in [0, 1]
            error = model.reconstruct(pixels).double() - target
            squared += float(error.square().sum())
            absolute += float(error.abs().sum())
            count += error.numel()
            channel_sum += target.sum(dim=(0, 2, 3)).cpu()
            channel_squares += target.square().sum(dim=(0, 2, 3)).cpu()
    finally:
        model.train(was_training)
    if not math.isfinite(squared):
        raise UserError("the model gives non-finite reconstructions, so its weights are damaged (a diverged training?); "
                        "load an earlier checkpoint or retrain")
    mse = squared / count
    per_channel = count / 3
    mean_colour_mse = float((channel_squares / per_channel - (channel_sum / per_channel) ** 2).mean())  # variance
    return {"mse": mse, "mae": absolute / count, "psnr": 10 * math.log10(1 / mse) if mse > 0 else math.inf,
            "mean_colour_mse": mean_colour_mse, "images": len(paths)}
