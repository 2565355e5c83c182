"""Conversations: template layout and label masks token by token, images, truncation, LLaVA JSON, synthetic dialogues."""
from __future__ import annotations

import json
import re

import pytest
import tokenizers
import torch
from PIL import Image
from tokenizers import decoders, models, pre_tokenizers, trainers
from torch.utils.data import DataLoader

from vlmkit.data.conversation import (IGNORE_INDEX, IMAGE_CUT, LLAVA_LLAMA_2_SYSTEM, NOTHING_SUPERVISED, UNREADABLE_IMAGE,
                                      VICUNA_SYSTEM, ConversationDataset, SkippedSample, check_messages,
                                      conversation_records, conversation_texts, encode_conversation, encode_prompt)
from vlmkit.data.formats import read_records
from vlmkit.data.loader import SkipCounter
from vlmkit.data.synthetic import SHORT_ANSWER_PROMPT, generate
from vlmkit.data.transforms import ImageTransform
from vlmkit.errors import UserError
from vlmkit.tokenizers import Tokenizer

WORDS = re.compile(r"\w+|[^\w\s]+")  # what pre_tokenizers.Whitespace splits on
SPECIALS = ["<pad>", "<s>", "</s>"]
CHAT = [{"from": "human", "value": "What is it?\n<image>"}, {"from": "gpt", "value": "A red star."},
        {"from": "user", "value": "And the color?"}, {"from": "assistant", "value": "Red."}]


def word_tokenizer() -> Tokenizer:
    """One id per word or punctuation run (so a label mask reads token by token), <image> special."""
    corpus = " ".join([VICUNA_SYSTEM, LLAVA_LLAMA_2_SYSTEM, "USER: ASSISTANT: [INST] [/INST] <<SYS>> <</SYS>>",
                       *(turn["value"] for turn in CHAT), "a long story about many shapes"])
    vocab = {token: i for i, token in enumerate(SPECIALS + ["[UNK]"] + sorted(set(WORDS.findall(corpus))))}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = Tokenizer(backend, bos_id=1, eos_id=2, pad_id=0)
    tokenizer.add_special_tokens(SPECIALS + ["<image>"])
    return tokenizer


def byte_tokenizer() -> Tokenizer:
    """A small byte-level BPE (GPT-2 style): decoding gives back the exact text, spaces and newlines included."""
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS + ["<image>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([VICUNA_SYSTEM, "USER: what is it? ASSISTANT: a red star."], trainer)
    return Tokenizer(backend, bos_id=1, eos_id=2, pad_id=0)


def expected(*segments: str) -> list[tuple[str, bool]]:
    """(token, supervised) from hand-written segments alternating masked, supervised, masked, ..."""
    return [(token, index % 2 == 1) for index, segment in enumerate(segments) for token in segment.split()]


def words(text: str) -> str:
    return " ".join(WORDS.findall(text))


def tokens_and_mask(encoded, tokenizer) -> list[tuple[str, bool]]:
    ids, labels = encoded.input_ids.tolist(), encoded.labels.tolist()
    # Supervised labels are the ids themselves (not shifted): the model shifts.
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(ids, labels))
    return [(tokenizer.backend.id_to_token(token), label != IGNORE_INDEX) for token, label in zip(ids, labels)]


def test_vicuna_v1_mask_token_by_token_multi_turn():
    tokenizer = word_tokenizer()
    encoded = encode_conversation(CHAT, "vicuna_v1", tokenizer, max_length=200)
    assert tokens_and_mask(encoded, tokenizer) == expected(
        f"<s> {words(VICUNA_SYSTEM)} USER : <image> What is it ? ASSISTANT :",  # image moved to the turn's start
        "A red star . </s>",
        "USER : And the color ? ASSISTANT :",
        "Red . </s>",
    )
    assert not encoded.truncated and encoded.num_images == 1


def test_llama_2_mask_token_by_token_multi_turn():
    tokenizer = word_tokenizer()
    encoded = encode_conversation(CHAT, "llama_2", tokenizer, max_length=200)
    assert tokens_and_mask(encoded, tokenizer) == expected(
        f"<s> [ INST ] << SYS >> {words(LLAVA_LLAMA_2_SYSTEM)} <</ SYS >> <image> What is it ? [/ INST ]",
        "A red star . </s>",
        "<s> [ INST ] And the color ? [/ INST ]",  # the next round's begin token is not supervised
        "Red . </s>",
    )


def test_plain_supervises_only_the_caption():
    tokenizer = word_tokenizer()
    caption = [{"from": "human", "value": "Describe it briefly.\n<image>"}, {"from": "gpt", "value": "A red star."}]
    encoded = encode_conversation(caption, "plain", tokenizer, max_length=50)
    assert tokens_and_mask(encoded, tokenizer) == expected("<s> <image>", "A red star .")  # human text dropped
    with pytest.raises(UserError, match="at most 1"):
        encode_conversation(CHAT, "plain", tokenizer, max_length=50)
    with pytest.raises(UserError, match="no image"):
        encode_conversation([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "A red star."}],
                            "plain", tokenizer, max_length=50)


def test_joined_text_is_the_reference_prompt_and_prompts_prefix_training():
    tokenizer = byte_tokenizer()

    def text(ids):
        return tokenizer.decode(ids, skip_special_tokens=False)

    vicuna = encode_conversation(CHAT, "vicuna_v1", tokenizer, max_length=1000)
    # conv_vicuna_v1.get_prompt() after preprocess_multimodal, behind the tokenizer's begin token.
    assert text(vicuna.input_ids) == (f"<s>{VICUNA_SYSTEM} USER: <image>\nWhat is it? ASSISTANT: A red star.</s>"
                                      f"USER: And the color? ASSISTANT: Red.</s>")
    assert text(vicuna.input_ids[vicuna.labels != IGNORE_INDEX]) == " A red star.</s> Red.</s>"
    llama = encode_conversation(CHAT, "llama_2", tokenizer, max_length=1000)
    assert text(llama.input_ids) == (f"<s>[INST] <<SYS>>\n{LLAVA_LLAMA_2_SYSTEM}\n<</SYS>>\n\n<image>\nWhat is it? [/INST] "
                                     f"A red star. </s><s>[INST] And the color? [/INST] Red. </s>")
    plain = encode_conversation(CHAT[:2], "plain", tokenizer, max_length=1000)
    assert text(plain.input_ids) == "<s><image>A red star.\n"
    assert text(plain.input_ids[plain.labels != IGNORE_INDEX]) == "A red star.\n"  # "\n" too, as preprocess_plain
    for template, encoded in (("vicuna_v1", vicuna), ("llama_2", llama)):
        prompt = encode_prompt(CHAT[:3], template, tokenizer)  # generation continues after the role marker
        assert torch.equal(prompt, encoded.input_ids[: len(prompt)])
        assert text(prompt).endswith("And the color? ASSISTANT:" if template == "vicuna_v1" else "And the color? [/INST]")
        first_round = encode_conversation(CHAT[:2], template, tokenizer, max_length=1000)
        assert (encoded.labels[: len(prompt)] != IGNORE_INDEX).sum() == (first_round.labels != IGNORE_INDEX).sum()


def test_image_placeholder_rules():
    tokenizer = word_tokenizer()
    image_id = tokenizer.token_to_id("<image>")
    no_placeholder = [{"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "A red star."}]
    encoded = encode_conversation(no_placeholder, "vicuna_v1", tokenizer, 200, has_image=True)
    ids = encoded.input_ids.tolist()
    assert ids.count(image_id) == 1 and encoded.num_images == 1  # one id, the model expands it later
    assert ids[ids.index(image_id) - 2:ids.index(image_id) + 2] == [tokenizer.token_to_id(t) for t in ("USER", ":", "<image>", "What")]
    assert encoded.labels[ids.index(image_id)] == IGNORE_INDEX
    assert encode_conversation(no_placeholder, "vicuna_v1", tokenizer, 200).num_images == 0
    with pytest.raises(UserError, match="1 <image> placeholder.*but 0 image"):
        encode_conversation(CHAT, "vicuna_v1", tokenizer, 200, has_image=False)
    with pytest.raises(UserError, match="assistant turn"):
        encode_conversation([CHAT[0], {"from": "gpt", "value": "<image> here"}], "vicuna_v1", tokenizer, 200)
    bare = byte_tokenizer()
    bare.backend = tokenizers.Tokenizer(models.WordLevel({"a": 0, "<s>": 1, "</s>": 2}, unk_token="a"))
    with pytest.raises(UserError, match=r"add_special_tokens\(\['<image>'\]\)"):
        encode_conversation(CHAT, "vicuna_v1", bare, 200)


def test_truncation_is_marked_and_cuts_through_images_skip():
    tokenizer = word_tokenizer()
    full = encode_conversation(CHAT, "vicuna_v1", tokenizer, 200)
    cut = encode_conversation(CHAT, "vicuna_v1", tokenizer, len(full.input_ids) - 3)
    assert cut.truncated and len(cut.input_ids) == len(full.input_ids) - 3
    assert torch.equal(cut.input_ids, full.input_ids[:-3]) and torch.equal(cut.labels, full.labels[:-3])
    # The image expands to 20 tokens in the model: the budget counts them, and a cut through them skips.
    image_at = full.input_ids.tolist().index(tokenizer.token_to_id("<image>"))
    expanded = encode_conversation(CHAT, "vicuna_v1", tokenizer, len(full.input_ids) + 19 - 3, tokens_per_image=20)
    assert expanded.truncated and len(expanded.input_ids) == len(full.input_ids) - 3
    with pytest.raises(SkippedSample) as skipped:
        encode_conversation(CHAT, "vicuna_v1", tokenizer, image_at + 10, tokens_per_image=20)
    assert skipped.value.reason == IMAGE_CUT
    with pytest.raises(SkippedSample) as skipped:
        encode_conversation(CHAT, "vicuna_v1", tokenizer, image_at + 3)  # the cut leaves only the prompt
    assert skipped.value.reason == NOTHING_SUPERVISED


@pytest.mark.parametrize("turns, message", [
    ([{"from": "human", "value": "What is it?"}], "no assistant turn"),
    ([{"from": "gpt", "value": "A star."}, {"from": "human", "value": "ok"}], "turn 0 is a gpt turn"),
    ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], "turn 1 is a human turn"),
    ([{"from": "system", "value": "a"}], "turn 0 is from 'system'"),
    ([{"from": "human"}], "no text"),
    ([], "no conversation turns"),
])
def test_invalid_conversations_raise_one_clear_sentence(turns, message):
    with pytest.raises(UserError, match=message) as error:
        check_messages(turns, where="data.json item 4")
    assert str(error.value).startswith("data.json item 4") and "\n" not in str(error.value)


@pytest.fixture
def llava_json(tmp_path):
    """LLaVA's own JSON: images relative to an image folder, one text-only record, one corrupt image."""
    folder = tmp_path / "images"
    folder.mkdir()
    gradient = Image.linear_gradient("L").resize((40, 30))
    Image.merge("RGB", (gradient, gradient.transpose(Image.Transpose.ROTATE_90).resize((40, 30)), gradient)).save(folder / "red.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    data = [
        {"id": "000001", "image": "red.png", "conversations": CHAT},
        {"id": "000002", "conversations": [{"from": "human", "value": "Tell me a long story about many shapes."},
                                           {"from": "gpt", "value": "A red star."}]},
        {"id": "000003", "image": "broken.jpg", "conversations": CHAT[:2]},
    ]
    path = tmp_path / "llava_v1_5_mix.json"
    path.write_text(json.dumps(data))
    return path, folder


def test_llava_json_is_read_as_it_is_and_batched(llava_json):
    path, folder = llava_json
    records = read_records(path, image_root=folder)
    assert [record["id"] for record in records] == ["000001", "000002", "000003"]
    assert records[0]["image"] == str(folder / "red.png") and "image" not in records[1]
    assert records[0]["conversations"] == CHAT and records[0]["texts"] == []
    tokenizer = word_tokenizer()
    dataset = ConversationDataset(records[:2], ImageTransform(32), tokenizer, "vicuna_v1", max_length=200, seed=0)
    batch = dataset.collate([dataset[0], dataset[1]])
    lengths = [len(encode_conversation(record["conversations"], "vicuna_v1", tokenizer, 200,
                                       has_image="image" in record).input_ids) for record in records[:2]]
    assert batch["pixels"].shape == (2, 3, 32, 32) and batch["has_image"].tolist() == [True, False]
    assert torch.count_nonzero(batch["pixels"][1]) == 0  # a text-only sample gets blank pixels
    assert batch["input_ids"].shape == batch["labels"].shape == (2, max(lengths))
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    short = min(range(2), key=lambda row: lengths[row])
    assert (batch["labels"][short, lengths[short]:] == IGNORE_INDEX).all()  # right padding, never supervised
    assert (batch["input_ids"][short, lengths[short]:] == tokenizer.pad_id).all()
    assert batch["num_skipped"] == 0 and batch["num_truncated"] == 0


def test_read_records_names_the_bad_llava_item(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"id": "a", "image": "x.png", "conversations": CHAT},
                                {"id": "b", "image": "x.png", "conversations": [{"from": "human", "value": "q"}]}]))
    with pytest.raises(UserError, match=r"bad\.json item 1 has no assistant turn"):
        read_records(path)


def test_corrupt_image_and_truncation_are_skipped_counted_and_reported(llava_json):
    path, folder = llava_json
    records = read_records(path, image_root=folder)
    tokenizer = word_tokenizer()
    full = len(encode_conversation(CHAT, "vicuna_v1", tokenizer, 200, has_image=True).input_ids)
    dataset = ConversationDataset(records, ImageTransform(32), tokenizer, "vicuna_v1", max_length=full - 2)
    counter = SkipCounter()
    rows = 0
    for batch in DataLoader(dataset, batch_size=2, collate_fn=dataset.collate):
        counter.update(batch)
        rows += batch["input_ids"].shape[0]
        assert batch["input_ids"].shape[1] <= full - 2
    assert rows == 2 and counter.total == 1 and counter.reasons == {UNREADABLE_IMAGE: 1}
    assert counter.examples == [str(folder / "broken.jpg")] and counter.truncated == 1
    message = counter.message()
    assert "skipped 1 sample(s) (1 unreadable image; 1 file)" in message and "1 sample(s) truncated" in message
    assert dataset.counts == {"skipped": 1, "skipped_files": 1, "skipped_examples": [str(folder / "broken.jpg")],
                              "skip_reasons": {UNREADABLE_IMAGE: 1}, "truncated": 1}
    # With DataLoader workers the counts travel in the batches, as the trainer sums them.
    in_workers = SkipCounter()
    for batch in DataLoader(dataset, batch_size=3, num_workers=1, collate_fn=dataset.collate):
        in_workers.update(batch)
    assert (in_workers.total, in_workers.reasons, in_workers.truncated) == (1, {UNREADABLE_IMAGE: 1}, 1)
    # A cut through the image is a skip with its reason, not a silently broken sample.
    tight = ConversationDataset(records[:1], ImageTransform(32), tokenizer, "vicuna_v1", max_length=40, tokens_per_image=30)
    batch = tight.collate([tight[0]])
    assert batch["input_ids"].shape[0] == 0 and batch["skip_reasons"] == {IMAGE_CUT: 1} and batch["skipped"] == ["000001"]


def test_dataset_checks_every_record_up_front_and_follows_the_epoch(llava_json, tmp_path):
    path, folder = llava_json
    records = read_records(path, image_root=folder)
    bad = dict(records[0], conversations=CHAT[:3])
    with pytest.raises(UserError, match="record 1 \\(id 000001\\) has no assistant turn"):
        ConversationDataset([records[1], bad], ImageTransform(32), word_tokenizer())
    transform = ImageTransform(32, train=True, crop_scale=(0.3, 1.0), hflip=0.5)
    first = ConversationDataset(records[:1], transform, word_tokenizer(), seed=1)
    second = ConversationDataset(records[:1], transform, word_tokenizer(), seed=1)
    second.set_epoch(1)
    second.set_epoch(0)
    assert torch.equal(first[0]["pixels"], second[0]["pixels"])
    assert torch.equal(first[0]["input_ids"], second[0]["input_ids"])
    changed = 0
    for epoch in range(1, 5):
        second.set_epoch(epoch)
        changed += not torch.equal(first[0]["pixels"], second[0]["pixels"])
    assert changed >= 3


def test_add_special_tokens_keeps_ids_and_survives_save_load(tmp_path):
    tokenizer = byte_tokenizer()
    size = tokenizer.vocab_size
    assert tokenizer.add_special_tokens(["<image>", "<s>"]) == [tokenizer.token_to_id("<image>"), 1]
    new_id, = tokenizer.add_special_tokens(["<im_patch>"])
    assert new_id == size and tokenizer.vocab_size == size + 1
    assert tokenizer.encode("look <im_patch> here", add_special_tokens=False).count(new_id) == 1
    tokenizer.save(tmp_path / "tok")
    assert Tokenizer.load(tmp_path / "tok").token_to_id("<im_patch>") == new_id


def test_synthetic_dialogues_are_deterministic_and_well_formed(synth_dir, tmp_path):
    records = read_records(synth_dir / "train.jsonl")
    types = {}
    for record in records:
        qa = {item["question"]: item["answer"] for item in record["qa"]}
        names = [obj["name"] for obj in record["objects"]]
        for dialogue in record["dialogues"]:
            turns = check_messages(dialogue["conversations"])
            types[dialogue["type"]] = types.get(dialogue["type"], 0) + 1
            assert turns[0][1].startswith("<image>\n") and sum("<image>" in text for _, text in turns) == 1
            if dialogue["type"] == "short_answer":
                question, suffix = turns[0][1][len("<image>\n"):].split("\n")
                assert suffix == SHORT_ANSWER_PROMPT and turns[1][1] == qa[question[0].lower() + question[1:]]
            elif dialogue["type"] == "counting":
                shape = re.fullmatch(r"<image>\nHow many (\w+)s are in the image\? Explain your answer\.", turns[0][1]).group(1)
                count = ["zero", "one", "two", "three", "four"][sum(name.endswith(" " + shape) for name in names)]
                assert turns[1][1].endswith(f"So the answer is {count}.")
            elif dialogue["type"] == "description":
                assert all(name in turns[1][1] for name in names)
            elif dialogue["type"] == "multi_turn":
                assert 2 <= len(turns) // 2 <= 3
    assert set(types) == {"short_answer", "description", "counting", "relation", "multi_turn"}
    assert types["short_answer"] == types["multi_turn"] == len(records) and types["relation"] > len(records) / 3
    # One LLaVA record per dialogue, all encodable with every chat template, none skipped.
    flat = conversation_records(records[:20])
    assert len(flat) == sum(len(record["dialogues"]) for record in records[:20]) and flat[0]["id"].endswith("#0")
    tokenizer = byte_tokenizer()
    tokenizer.add_special_tokens(["<image>"])
    dataset = ConversationDataset(flat, ImageTransform(64), tokenizer, "vicuna_v1", max_length=4096)
    batch = dataset.collate([dataset[i] for i in range(len(dataset))])
    assert batch["input_ids"].shape[0] == len(flat) and batch["has_image"].all() and batch["num_skipped"] == 0
    assert len(conversation_texts(records[:2])) == sum(len(d["conversations"]) for r in records[:2] for d in r["dialogues"])
    generate(tmp_path / "a", n=12, seed=3, progress=False)
    generate(tmp_path / "b", n=12, seed=3, progress=False)
    assert (tmp_path / "a" / "train.jsonl").read_bytes() == (tmp_path / "b" / "train.jsonl").read_bytes()
