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
