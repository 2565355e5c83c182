"""VSE++: the hinge ranking loss on the hardest negative, after a warm-up on summed negatives."""
import torch
import torch.nn.functional as F

import vlmkit
from vlmkit.losses import hinge_triplet_loss


def test_vsepp_sums_negatives_for_hardest_after_updates_then_takes_the_hardest(tmp_path):
    model = vlmkit.create_model("vsepp-tiny").eval()
    model.training_options = model.parse_training_options({"hardest_after": 1})
    batch = model.dummy_batch(4)
    with torch.no_grad():
        image, text = model.encode_image(batch["pixels"]), model.encode_text(batch["tokens"])
        summed, scores = hinge_triplet_loss(image, text, margin=0.2, hardest=False)
        hardest, _ = hinge_triplet_loss(image, text, margin=0.2, hardest=True)
        assert torch.allclose(scores, F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T, atol=1e-6)
        first = model(batch)
        model.after_optimizer_step()
        second = model(batch)
    assert torch.allclose(first.loss, summed) and float(first.logs["hardest"]) == 0.0
    assert torch.allclose(second.loss, hardest) and float(second.logs["hardest"]) == 1.0
    assert hardest <= summed
    model.save_pretrained(tmp_path / "run")
    assert int(vlmkit.load(tmp_path / "run").updates.count) == 1  # exact resume keeps the schedule's place


def test_a_run_saved_before_the_update_counter_still_loads(tmp_path):
    from vlmkit.io import load_safetensors, save_safetensors

    model = vlmkit.create_model("vsepp-tiny")
    model.save_pretrained(tmp_path / "run")
    state = load_safetensors(tmp_path / "run" / "model.safetensors")
    del state["updates.count"]  # what an earlier vlmkit wrote
    save_safetensors(state, tmp_path / "run" / "model.safetensors")
    loaded = vlmkit.load(tmp_path / "run")
    assert int(loaded.updates.count) == 0
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
