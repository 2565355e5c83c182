"""Training losses shared by the families.

Contrastive (CLIP/ALIGN) and sigmoid (SigLIP) losses gather features from every rank when a
process group is running, keeping gradients through the gather; with `local_loss` each rank
scores only its own rows against the global batch, so memory grows linearly with the global
batch (OpenCLIP's `--local-loss --gather-with-grad`). With no process group they are the
plain single-process losses.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums each rank's gradient for this rank's rows.

    torch.distributed.nn's all_gather emulates reduce-scatter with scatter calls on gloo, and
    two of those in one backward left a gloo thread joinable at exit (SIGABRT in 5 of 20
    two-process runs here); an all-reduce (gloo) or reduce-scatter (NCCL) has no such problem.
    """

    @staticmethod
    def forward(ctx, features: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        features = features.contiguous()
        gathered = [torch.empty_like(features) for _ in range(world)]
        dist.all_gather(gathered, features)
        return torch.cat(gathered, dim=0)  # (world*B, D)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        rows = grad.shape[0] // world
        if dist.get_backend() == dist.Backend.NCCL:
            local = torch.empty((rows, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter_tensor(local, grad.contiguous())
            return local
        grad = grad.clone(memory_format=torch.contiguous_format)  # all_reduce works in place
        dist.all_reduce(grad)
        return grad[rank * rows : (rank + 1) * rows]  # (B, D)


def gather_features(features: torch.Tensor) -> torch.Tensor:
    """Concatenate (B, D) features from all ranks into (world*B, D), gradients flowing back."""
    if not _distributed():
        return features
    return _GatherWithGrad.apply(features)


def contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    local_loss: bool = True,
    label_smoothing: float = 0.0,
    negative_features: torch.Tensor | None = None,
    negative_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE over L2-normalised features: (CE(logits) + CE(logits.T)) / 2.

    `negative_features` (B, D), NegCLIP's hard negative captions (one per row, `negative_mask` (B,)
    False where a row has none): extra columns every image scores against, after the batch's
    texts, in the image -> text term only; the text -> image term is CLIP's.
    Returns the loss and the local (B, B_global) image->text logits (for logging accuracy).
    """
    image_features = F.normalize(image_features, dim=-1)  # (B, D)
    text_features = F.normalize(text_features, dim=-1)  # (B, D)
    scale = logit_scale.exp()
    batch = image_features.shape[0]
    if _distributed():
        all_images, all_texts = gather_features(image_features), gather_features(text_features)  # (G, D)
        if local_loss:
            logits_per_image = scale * image_features @ all_texts.T  # (B, G)
            logits_per_text = scale * text_features @ all_images.T  # (B, G)
            labels = torch.arange(batch, device=image_features.device) + batch * dist.get_rank()
        else:
            logits_per_image = scale * all_images @ all_texts.T  # (G, G)
            logits_per_text = logits_per_image.T
            labels = torch.arange(all_images.shape[0], device=image_features.device)
    else:
        logits_per_image = scale * image_features @ text_features.T  # (B, B)
        logits_per_text = logits_per_image.T
        labels = torch.arange(batch, device=image_features.device)
    image_side = logits_per_image
    if negative_features is not None:
        negatives = gather_features(F.normalize(negative_features, dim=-1))  # (G, D)
        images = all_images if _distributed() and not local_loss else image_features
        negative_logits = scale * images @ negatives.T  # (B or G, G)
        if negative_mask is not None:
            has_negative = gather_features(negative_mask.to(negatives.dtype)[:, None])[:, 0] > 0  # (G,)
            negative_logits = negative_logits.masked_fill(~has_negative, float("-inf"))
        image_side = torch.cat([logits_per_image, negative_logits], dim=1)  # (B, 2G): texts, then negatives
    loss = (
        F.cross_entropy(image_side, labels, label_smoothing=label_smoothing)
        + F.cross_entropy(logits_per_text, labels, label_smoothing=label_smoothing)
    ) / 2
    return loss, logits_per_image


@torch.no_grad()
def matching_accuracy(logits: torch.Tensor) -> torch.Tensor:
    """How often row i of (B, B_global) logits scores its own pair highest: the pair's column is i, or
    rank * B + i when a distributed local loss scored this rank's rows against every rank's columns."""
    rows = logits.shape[0]
    targets = torch.arange(rows, device=logits.device)
    if logits.shape[1] != rows:
        targets = targets + rows * dist.get_rank()
    return (logits.argmax(dim=1) == targets).float().mean()


def sigmoid_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SigLIP: -logsigmoid(labels * (s * img @ txt.T + b)).sum() / B, labels = 2*eye - 1.

    Distributed, each rank scores its images against every rank's texts (the all-gather
    variant of the paper's chunked exchange; the sum over all pairs is the same).
    """
    image_features = F.normalize(image_features, dim=-1)
    text_features = F.normalize(text_features, dim=-1)
    batch = image_features.shape[0]
    all_texts = gather_features(text_features)  # (G, D)
    logits = logit_scale.exp() * image_features @ all_texts.T + logit_bias  # (B, G)
    offset = batch * dist.get_rank() if _distributed() else 0
    labels = -torch.ones_like(logits)
    labels[torch.arange(batch), torch.arange(batch) + offset] = 1.0
    loss = -F.logsigmoid(labels * logits).sum() / batch
    return loss, logits


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, target_mask: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Next-token cross-entropy averaged over the target positions where `target_mask` is True.

    logits (B, T, V) predict targets (B, T); padding and everything after the end token are
    masked out by the caller (never by comparing with a pad id, which may be a real token).
    """
    loss = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), reduction="none", label_smoothing=label_smoothing
    )  # (B*T,)
    weights = target_mask.flatten().to(loss.dtype)
    return (loss * weights).sum() / weights.sum().clamp(min=1.0)


def lm_loss_and_logs(logits: torch.Tensor, targets: torch.Tensor, target_mask: torch.Tensor,
                     label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A captioning LM step's `lm_loss` and its logs (loss, token accuracy) as detached tensors."""
    loss = lm_loss(logits, targets, target_mask, label_smoothing)
    with torch.no_grad():
        correct = ((logits.argmax(-1) == targets) & target_mask).sum() / target_mask.sum().clamp(min=1)
    return loss, {"loss": loss.detach(), "token_acc": correct}


def hinge_triplet_loss(image_features: torch.Tensor, text_features: torch.Tensor, margin: float = 0.2,
                       hardest: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """VSE++'s ranking loss (Faghri et al. 2018) over cosine similarities of matching rows.

    For each positive pair (i, i): hinge [margin - s(i, i) + s(i, j)]_+ over the texts j != i and
    [margin - s(i, i) + s(j, i)]_+ over the images j != i. `hardest=True` keeps only the hardest
    negative of each (VSE++'s max of hinges), `False` sums them all (VSE0). Summed over the batch,
    as in the paper. Returns the loss and the (B, B) similarity matrix.
    """
    images = F.normalize(image_features, dim=-1)  # (B, D)
    texts = F.normalize(text_features, dim=-1)  # (B, D)
    scores = images @ texts.T  # (B, B): image i against text j
    return hinge_triplet_loss_from_scores(scores, margin, hardest), scores


def hinge_triplet_loss_from_scores(scores: torch.Tensor, margin: float = 0.2, hardest: bool = True) -> torch.Tensor:
    """`hinge_triplet_loss` over a given (B, B) similarity matrix (image i against text j, pairs on the
    diagonal), for similarities that are not one dot product (a global term plus a cross-attended one)."""
    positive = scores.diagonal()  # (B,)
    is_positive = torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device)
    cost_text = (margin + scores - positive[:, None]).clamp(min=0).masked_fill(is_positive, 0)  # image i, wrong text j
    cost_image = (margin + scores - positive[None, :]).clamp(min=0).masked_fill(is_positive, 0)  # text j, wrong image i
    if hardest:
        return cost_text.max(dim=1).values.sum() + cost_image.max(dim=0).values.sum()
    return cost_text.sum() + cost_image.sum()


def unicl_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    labels: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Florence/UniCL's bidirectional contrastive loss: every pair sharing a label is a positive.

    `labels` (B,) are integer class ids; a record with no label must get an id of its own (so an
    all-distinct batch is exactly CLIP's `contrastive_loss`). The target of image i is the
    uniform distribution over the texts k with y_k = y_i (T_ij = 1[y_i = y_j] normalised per
    row), and symmetrically for texts; the loss is (L_i2t + L_t2i) / 2 — the paper sums the two,
    halving keeps it on CLIP's scale. Distributed, features and labels are gathered and each rank
    scores its own rows against the global batch (OpenCLIP's local loss). Returns the loss and the
    (B, B_global) image->text logits.
    """
    image_features = F.normalize(image_features, dim=-1)  # (B, D)
    text_features = F.normalize(text_features, dim=-1)  # (B, D)
    scale = logit_scale.exp()
    all_images, all_texts, all_labels = image_features, text_features, labels
    if _distributed():
        all_images, all_texts = gather_features(image_features), gather_features(text_features)  # (G, D)
        gathered = [torch.empty_like(labels) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, labels.contiguous())
        all_labels = torch.cat(gathered)  # (G,)
    logits_per_image = scale * image_features @ all_texts.T  # (B, G)
    logits_per_text = scale * text_features @ all_images.T  # (B, G)
    targets = (labels[:, None] == all_labels[None, :]).to(logits_per_image.dtype)  # (B, G)
    targets = targets / targets.sum(dim=1, keepdim=True)  # each row sums to 1 (its own pair is always in it)
    image_to_text = -(targets * F.log_softmax(logits_per_image, dim=-1)).sum(dim=1).mean()
    text_to_image = -(targets * F.log_softmax(logits_per_text, dim=-1)).sum(dim=1).mean()
    return (image_to_text + text_to_image) / 2, logits_per_image

# ---- BLIP: contrastive loss against a momentum encoder's queue, hard negatives for ITM ---------
def momentum_contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    image_features_m: torch.Tensor,
    text_features_m: torch.Tensor,
    image_queue: torch.Tensor,
    text_queue: torch.Tensor,
    temperature: torch.Tensor,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BLIP's (and ALBEF's) image-text contrastive loss with momentum distillation.

    Online features (B, D) are scored against the momentum encoder's features of this batch
    followed by the feature queues (Q, D) of past batches' momentum features, all L2-normalised:
    `sim_i2t = img @ [txt_m ; text_queue].T / temperature` (and t2i alike). The soft targets mix
    the momentum model's own similarity distribution with the one-hot pairing,
    `alpha * softmax(sim_m) + (1 - alpha) * onehot`, and the loss is the cross-entropy against
    them, averaged over both directions (blip_pretrain.py). Returns the loss and the online
    (B, B) in-batch similarities i2t and t2i (divided by the temperature), which the ITM hard
    negatives are drawn from.
    """
    batch = image_features.shape[0]
    image_features, text_features = F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1)
    with torch.no_grad():
        all_images_m = torch.cat([F.normalize(image_features_m, dim=-1), image_queue], dim=0)  # (B+Q, D)
        all_texts_m = torch.cat([F.normalize(text_features_m, dim=-1), text_queue], dim=0)  # (B+Q, D)
        onehot = torch.zeros(batch, all_texts_m.shape[0], device=image_features.device)
        onehot[:, :batch] = torch.eye(batch, device=image_features.device)
        sim_i2t_m = all_images_m[:batch] @ all_texts_m.T / temperature  # (B, B+Q)
        sim_t2i_m = all_texts_m[:batch] @ all_images_m.T / temperature  # (B, B+Q)
        targets_i2t = alpha * sim_i2t_m.float().softmax(dim=1) + (1 - alpha) * onehot
        targets_t2i = alpha * sim_t2i_m.float().softmax(dim=1) + (1 - alpha) * onehot
    sim_i2t = image_features @ all_texts_m.T / temperature  # (B, B+Q)
    sim_t2i = text_features @ all_images_m.T / temperature  # (B, B+Q)
    loss_i2t = -(F.log_softmax(sim_i2t.float(), dim=1) * targets_i2t).sum(dim=1).mean()
    loss_t2i = -(F.log_softmax(sim_t2i.float(), dim=1) * targets_t2i).sum(dim=1).mean()
    return (loss_i2t + loss_t2i) / 2, sim_i2t[:, :batch], sim_t2i[:, :batch]


@torch.no_grad()
def enqueue(queues: tuple[torch.Tensor, ...], features: tuple[torch.Tensor, ...], pointer: torch.Tensor) -> None:
    """Write each (B, D) feature batch (gathered from every rank when distributed) into its (Q, D) ring
    buffer at `pointer` (a 0-d long tensor shared by the queues), wrapping around, then advance the
    pointer; all in place. A batch larger than the queue keeps its last Q rows."""
    size = queues[0].shape[0]
    written = 0
    for queue, rows in zip(queues, features):
        rows = gather_features(rows.detach())[-size:]  # (min(world*B, Q), D)
        index = (pointer + torch.arange(rows.shape[0], device=queue.device)) % size
        queue.index_copy_(0, index, rows.to(queue.dtype))
        written = rows.shape[0]
    pointer.copy_((pointer + written) % size)


@torch.no_grad()
def sample_hard_negatives(similarity: torch.Tensor, generator: torch.Generator | None = None,
                          also_matches: torch.Tensor | None = None) -> torch.Tensor:
    """For each row i of a (B, B) similarity matrix, one column j != i drawn with probability
    proportional to softmax(similarity[i]) over the columns other than i (BLIP's hard negatives).

    Vectorised: one `torch.multinomial` over the whole batch. BLIP adds 1e-4 before zeroing the
    diagonal so that a row whose softmax underflows everywhere still has negatives to draw.
    `also_matches` (B, B), True where column j is a match of row i too (another pair with the same
    caption): those are never drawn, since the hardest "negative" of a duplicated caption is then a
    positive labelled as a negative, and an ITM head fed such labels learns the class prior and
    nothing else. A row whose every other column also matches keeps BLIP's draw. Returns (B,)
    column indices; B must be at least 2.
    """
    if similarity.shape[0] < 2:
        raise ValueError("hard negatives need a batch of at least 2 pairs")
    weights = similarity.float().softmax(dim=1) + 1e-4  # (B, B)
    weights.fill_diagonal_(0)  # the positive is never drawn
    if also_matches is not None:
        allowed = weights.masked_fill(also_matches, 0)  # (B, B)
        weights = torch.where(allowed.sum(dim=1, keepdim=True) > 0, allowed, weights)
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)  # (B,)


# ---- fusion encoders: masked region modelling and word-region alignment (UNITER) ---------------

def masked_region_feature_loss(predicted: torch.Tensor, target: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Masked region feature regression (UNITER MRFR): mean squared error between the predicted (B, T, C)
    and the input (B, T, C) features of the masked (B, T) regions, averaged over their elements."""
    if not bool(masked.any()):
        return predicted.sum() * 0
    return F.mse_loss(predicted[masked], target[masked].detach())


def masked_region_kl_loss(logits: torch.Tensor, target: torch.Tensor, masked: torch.Tensor | None = None) -> torch.Tensor:
    """Masked region classification with KL divergence (UNITER MRC-kl): KL(target || softmax(logits)) of
    each masked (B, T) region, logits (B, T, K) against its label distribution (B, T, K), averaged over
    the masked regions; with `masked` None, the rows (M, K) given are the masked regions. (With a one-hot
    target this is the cross-entropy, UNITER's MRC.)"""
    if masked is not None:
        logits, target = logits[masked], target[masked]  # (M, K)
    if logits.shape[0] == 0:
        return logits.sum() * 0
    log_probs = F.log_softmax(logits.float(), dim=-1)
    return F.kl_div(log_probs, target.float(), reduction="none").sum(-1).mean()


def cosine_cost(text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """(B, M, D), (B, N, D) -> (B, M, N) transport cost 1 - cos(text_i, image_j)."""
    return 1 - F.normalize(text, dim=-1, eps=1e-5) @ F.normalize(image, dim=-1, eps=1e-5).transpose(1, 2)


def ipot_plan(cost: torch.Tensor, text_real: torch.Tensor, image_real: torch.Tensor, beta: float = 0.5,
              iterations: int = 50, inner: int = 1) -> torch.Tensor:
    """Inexact proximal point optimal transport (Xie et al. 2018, as UNITER's model/ot.py): the (B, M, N)
    plan between uniform distributions over the real text (B, M) and image (B, N) positions for `cost`
    (B, M, N); padded rows and columns carry no mass. No gradient flows through the plan."""
    cost = cost.detach()
    dtype = cost.dtype
    text_len = text_real.sum(1).to(dtype)[:, None, None]  # (B, 1, 1)
    image_len = image_real.sum(1).to(dtype)[:, None, None]
    joint = text_real[:, :, None] & image_real[:, None, :]  # (B, M, N)
    kernel = torch.exp(-cost / beta) * joint  # A
    plan = joint.to(dtype)  # T starts as ones on the real pairs
    sigma = image_real.to(dtype)[:, :, None] / image_len  # (B, N, 1)
    text_pad = (~text_real).to(dtype)[:, None, :] * 1e4  # (B, 1, M): a padded position gets ~0
    image_pad = (~image_real).to(dtype)[:, None, :] * 1e4  # (B, 1, N)
    for _ in range(iterations):
        q = kernel * plan  # (B, M, N)
        for _ in range(inner):
            delta = 1 / (text_len * (q @ sigma).transpose(1, 2) + text_pad)  # (B, 1, M)
            sigma = (1 / (image_len * (delta @ q) + image_pad)).transpose(1, 2)  # (B, N, 1)
        plan = delta.transpose(1, 2) * q * sigma.transpose(1, 2)  # diag(delta) Q diag(sigma)
    return plan * joint


def optimal_transport_distance(text: torch.Tensor, image: torch.Tensor, text_real: torch.Tensor,
                               image_real: torch.Tensor, beta: float = 0.5, iterations: int = 50) -> torch.Tensor:
    """(B,) the Wasserstein distance sum_ij C_ij T_ij between a pair's word (B, M, D) and region (B, N, D)
    states under the cosine cost, with the IPOT plan T (held fixed: the gradient reaches the states
    through the cost only, as in UNITER)."""
    cost = cosine_cost(text, image) * (text_real[:, :, None] & image_real[:, None, :])
    plan = ipot_plan(cost, text_real, image_real, beta, iterations)
    return (cost * plan).sum(dim=(1, 2))


def word_region_alignment_loss(text: torch.Tensor, image: torch.Tensor, text_real: torch.Tensor,
                               image_real: torch.Tensor, matched: torch.Tensor, beta: float = 0.5,
                               iterations: int = 50) -> torch.Tensor:
    """UNITER's WRA: the OT distance is lowered on matched pairs and raised on the others,
    (sum over matched - sum over unmatched) / B (`matched` (B,) bool)."""
    distance = optimal_transport_distance(text, image, text_real, image_real, beta, iterations)  # (B,)
    sign = matched.to(distance.dtype) * 2 - 1
    return (sign * distance).sum() / max(len(distance), 1)
