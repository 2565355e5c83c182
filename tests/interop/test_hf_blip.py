"""HF transformers BLIP folders: exact fp32 parity on load (image features, ITM logits, caption logits), export back."""
import pytest
import torch

import vlmkit
from vlmkit.errors import UserError

from interop_helpers import randomise_, transformers

TOLERANCE = 1e-5
VOCAB = 120


def _hf_config():
    """A tiny BlipConfig: 2 layers per side, an MLP ratio that is not 4, vision width != text width."""
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8, layer_norm_eps=1e-5)
    text = dict(vocab_size=VOCAB, hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                encoder_hidden_size=32, max_position_embeddings=40, bos_token_id=VOCAB - 2, sep_token_id=3, pad_token_id=0,
                eos_token_id=3)
    return transformers.BlipConfig(vision_config=vision, text_config=text, image_text_hidden_size=16)


def _save(cls, folder, seed):
    torch.manual_seed(seed)
    hf = cls(_hf_config()).eval()
    randomise_(hf, seed)
    if cls is transformers.BlipForConditionalGeneration:  # keep the tie HF's loader re-applies
        hf.tie_weights()
    hf.save_pretrained(folder)
    return cls.from_pretrained(folder).eval()  # what the folder holds, as HF reads it


def _inputs():
    generator = torch.Generator().manual_seed(3)
    pixels = torch.randn(3, 3, 32, 32, generator=generator)
    ids = torch.randint(5, VOCAB - 3, (3, 9), generator=generator)
    ids[:, 0] = 2  # [CLS]
    ids[:, -1] = 3  # [SEP]
    return pixels, ids


@pytest.fixture(scope="module")
def captioner(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf_blip_caption")
    return _save(transformers.BlipForConditionalGeneration, folder, seed=1), folder


@pytest.fixture(scope="module")
def retrieval(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf_blip_itm")
    return _save(transformers.BlipForImageTextRetrieval, folder, seed=2), folder


def _caption_difference(hf, ours, pixels, ids):
    decoder_ids = ids.clone()
    decoder_ids[:, 0] = hf.config.text_config.bos_token_id  # [DEC], as HF's generate and vlmkit's decoder put it
    with torch.no_grad():
        hf_out = hf(pixel_values=pixels, input_ids=decoder_ids)
        image = ours.image_tokens(pixels)
        logits = ours.caption_logits(image, ours._with_first(ids, ours.config.dec_token_id))
    assert hf_out.logits.abs().mean() > 0.05  # not a degenerate comparison
    return (image - hf_out.image_embeds).abs().max().item(), (logits - hf_out.logits).abs().max().item()


def test_hf_captioner_loads_strictly_with_exact_features_and_logits(captioner):
    hf, folder = captioner
    ours = vlmkit.load(folder)
    assert ours.family == "blip" and ours.config.decoder and not ours.config.encoder
    assert [c.name for c in ours.capabilities] == ["generate text"]  # no ITM head in a captioner
    image_diff, logits_diff = _caption_difference(hf, ours, *_inputs())
    assert image_diff < TOLERANCE and logits_diff < TOLERANCE


def test_cached_greedy_decoding_matches_hf_generate(captioner):
    hf, folder = captioner
    ours = vlmkit.load(folder)
    pixels, _ = _inputs()
    from vlmkit.generation import generate

    with torch.no_grad():
        expected = hf.generate(pixel_values=pixels, max_new_tokens=6, min_new_tokens=6, do_sample=False, num_beams=1)
        step, prompt = ours.decoding_setup(pixels, None)  # no tokenizer in the folder: [DEC] alone
        output = generate(step, prompt, max_new_tokens=6, min_new_tokens=6, eos_token_id=ours.config.text.eos_token_id)
    assert torch.equal(output.tokens, expected[:, 1:])  # HF's output starts with its [DEC]


def test_hf_retrieval_loads_strictly_with_exact_itm_and_itc(retrieval):
    hf, folder = retrieval
    ours = vlmkit.load(folder)
    assert ours.config.encoder and not ours.config.decoder and ours.config.enc_token_id is None
    pixels, ids = _inputs()
    with torch.no_grad():
        hf_itm = hf(input_ids=ids, pixel_values=pixels, use_itm_head=True).itm_score  # (B, 2)
        hf_itc = hf(input_ids=ids, pixel_values=pixels, use_itm_head=False).itm_score  # (B, B) cosines
        hf_image = hf.vision_model(pixel_values=pixels).last_hidden_state
        itm = ours.itm_logits(ours.image_tokens(pixels), ids)
        image = torch.nn.functional.normalize(ours.encode_image(pixels), dim=-1)
        text = torch.nn.functional.normalize(ours.encode_text(ids), dim=-1)
    assert hf_itm.abs().mean() > 0.01
    assert (ours.image_tokens(pixels) - hf_image).abs().max() < TOLERANCE
    assert (itm - hf_itm).abs().max() < TOLERANCE
    assert (image @ text.T - hf_itc).abs().max() < TOLERANCE
    assert torch.allclose(ours.match(pixels, ids), hf_itm.softmax(-1)[:, 1], atol=TOLERANCE)


@pytest.mark.parametrize("kind", ["captioner", "retrieval"])
def test_export_back_to_hf_is_loaded_by_transformers_without_missing_keys(kind, captioner, retrieval, tmp_path):
    hf, folder = captioner if kind == "captioner" else retrieval
    ours = vlmkit.load(folder)
    ours.save_pretrained(tmp_path, format="hf")
    cls = type(hf)
    again, info = cls.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    reference = dict(hf.state_dict())
    for key, tensor in again.state_dict().items():
        assert torch.equal(tensor, reference[key]), key
    assert vlmkit.load(tmp_path).config == ours.config  # and back into vlmkit


def test_a_model_with_both_sides_cannot_be_written_as_hf(tmp_path):
    model = vlmkit.create_model("blip-tiny")
    with pytest.raises(UserError, match="both the encoder and the decoder"):
        model.save_pretrained(tmp_path, format="hf")
