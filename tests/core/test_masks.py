"""Masks checked token by token against their papers' definitions."""
import torch

from vlmkit.layers.masks import causal_mask, padding_mask, prefix_lm_mask


def test_causal_mask_definition():
    mask = causal_mask(5)
    for i in range(5):
        for j in range(5):
            assert bool(mask[i, j]) == (j <= i)


def test_causal_mask_with_cached_keys_offsets_queries():
    mask = causal_mask(2, 6)  # 4 cached keys, 2 new queries at positions 4 and 5
    for i in range(2):
        for j in range(6):
            assert bool(mask[i, j]) == (j <= i + 4)


def test_prefix_lm_mask_definition():
    # SimVLM: bidirectional over the prefix, causal over the rest (suffix sees prefix and earlier suffix).
    prefix = torch.tensor([3, 0, 6])
    mask = prefix_lm_mask(prefix, 6)
    assert mask.shape == (3, 1, 6, 6)
    for b, p in enumerate(prefix.tolist()):
        for i in range(6):
            for j in range(6):
                assert bool(mask[b, 0, i, j]) == (j < p or j <= i), (b, i, j)


def test_padding_mask_shape_and_values():
    mask = padding_mask(torch.tensor([[1, 1, 0], [1, 0, 0]]))
    assert mask.shape == (2, 1, 1, 3)
    assert mask[0, 0, 0].tolist() == [True, True, False]
    assert mask[1, 0, 0].tolist() == [True, False, False]


def test_dalle_text_to_image_mask_definition():
    # DALL-E: text token i sees text j <= i and no image token; image token i sees all text and image j <= i.
    from vlmkit.layers.masks import text_to_image_mask

    text, image = 3, 4
    mask = text_to_image_mask(text, image)
    assert mask.shape == (7, 7)
    for q in range(7):
        for k in range(7):
            if q < text:  # a text query
                expected = k < text and k <= q
            else:  # an image query: every text key, earlier (and its own) image keys
                expected = k < text or (k - text) <= (q - text)
            assert bool(mask[q, k]) == expected, (q, k)
    # With per-position pad tokens (the paper's choice) it is exactly the causal mask of the sequence.
    assert torch.equal(mask, causal_mask(7))


def test_dalle_mask_with_hidden_text_pads():
    from vlmkit.layers.masks import text_to_image_mask

    real = torch.tensor([[1, 1, 0], [1, 1, 1]])  # row 0: the last text position is a pad
    mask = text_to_image_mask(3, 2, text_is_real=real)
    assert mask.shape == (2, 1, 5, 5)
    base = text_to_image_mask(3, 2)
    for b in range(2):
        for q in range(5):
            for k in range(5):
                expected = bool(base[q, k]) and (bool(real[b, k]) if k < 3 else True) or (q == k)
                assert bool(mask[b, 0, q, k]) == expected, (b, q, k)


def test_media_mask_each_token_sees_only_the_latest_image_and_none_before_the_first():
    from vlmkit.layers.masks import media_mask

    # Rows: text, <image>, text, text, <image>, text ... (1 = <image>); 3 images at most, 2 latents each.
    locations = torch.tensor([[0, 1, 0, 0, 1, 0, 1, 0],
                              [1, 0, 0, 0, 0, 0, 0, 0],
                              [0, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    per_image = 2
    mask, attends_any = media_mask(locations, num_media=3, tokens_per_media=per_image)
    assert mask.shape == (3, 1, 8, 6) and attends_any.shape == (3, 8)
    for b in range(3):
        for t in range(8):
            # The definition: the latest <image> at or before t (itself included), none before the first.
            seen = [s for s in range(t + 1) if locations[b, s]]
            latest = len(seen)  # 1-based image index, 0 = no image yet
            assert bool(attends_any[b, t]) == (latest > 0), (b, t)
            for key in range(6):
                image = key // per_image + 1
                expected = image == latest if latest else True  # no image: an all-True row, output zeroed by attends_any
                assert bool(mask[b, 0, t, key]) == expected, (b, t, key)
