"""Fixtures of the interop tests (builders live in interop_helpers.py)."""
import pytest
from interop_helpers import CAPTIONS, transformers


@pytest.fixture(scope="session")
def clip_tokenizer_dir(tmp_path_factory):
    """An HF CLIPTokenizerFast folder (tokenizer.json, special_tokens_map.json, ...) over a small trained BPE."""
    from vlmkit.tokenizers import train_clip_bpe

    files = tmp_path_factory.mktemp("bpe")
    train_clip_bpe(CAPTIONS * 4, vocab_size=600, context_length=16).save_vocab(files)
    hf = transformers.CLIPTokenizerFast(str(files / "vocab.json"), str(files / "merges.txt"), model_max_length=16)
    folder = tmp_path_factory.mktemp("hf_tokenizer")
    hf.save_pretrained(folder)
    return folder
