"""TensorBoard extras: the attention-mask picture and the flattened hyper-parameters."""

import torch

from lightning_modules.callbacks import BLOCK_COLOURS, attention_mask_image, flat_config
from lightning_modules.masking import label_masked_attention

WHITE = (255, 255, 255)


def test_the_mask_picture_shows_which_blocks_see_which():
    seg = torch.tensor([-1, -1, 0, 0, 1, 1, 2, -2])  # image, prompt, label 1, label 2, padding
    picture = attention_mask_image(seg, label_masked_attention(seg[None])[0, 0], min_size=16)
    assert picture.shape == (16, 16, 3)  # 8 tokens, 2 pixels each
    cell = lambda q, k: tuple(int(c) for c in picture[2 * q, 2 * k])  # noqa: E731
    assert cell(0, 1) == BLOCK_COLOURS[-1]  # image rows see the whole image
    assert cell(0, 2) == WHITE  # ... and nothing else
    assert cell(3, 2) == BLOCK_COLOURS[0] and cell(2, 3) == WHITE  # the prompt is causal
    label1, label2 = cell(5, 4), cell(6, 6)
    assert label1 not in (WHITE, label2) and cell(5, 1) == label1 and cell(5, 3) == label1  # image + prompt
    assert cell(6, 4) == WHITE and cell(6, 5) == WHITE  # label 2 cannot see label 1
    assert cell(7, 0) == BLOCK_COLOURS[-2] and cell(7, 7) == WHITE  # padding sees only the image


def test_flat_config_keeps_scalars_and_names_nested_keys():
    flat = flat_config({"model": {"lr": 0.002, "decoder": {"num_blocks": 2, "name_or_path": None}, "eval_topk": [5, 10]},
                        "seed_everything": 0})
    assert flat == {"model.lr": 0.002, "model.decoder.num_blocks": 2, "model.decoder.name_or_path": "None",
                    "model.eval_topk": "[5, 10]", "seed_everything": 0}
