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
    flat = flat_config(
        {
            "model": {
                "optimization": {"lr": 0.002},
                "nxtp": {"decoder": {"num_blocks": 2, "name_or_path": None}},
                "evaluation": {"topk": [5, 10]},
            },
            "seed_everything": 0,
        }
    )
    assert flat == {
        "model.optimization.lr": 0.002,
        "model.nxtp.decoder.num_blocks": 2,
        "model.nxtp.decoder.name_or_path": "None",
        "model.evaluation.topk": "[5, 10]",
        "seed_everything": 0,
    }


def test_the_validation_grid_shows_each_image_with_its_top3_labels_maps(llama_tokenizer_dir):
    # Under inference mode, as Lightning validates; the tiles hold the image, the labels and one map per label.
    import types

    import numpy as np

    from lightning_modules.attention_maps import explain, overlay, pixels_to_image
    from lightning_modules.batch import Batch
    from lightning_modules.callbacks import ValidationPredictions, caption_tile
    from lightning_modules.decoder import DecoderConfig
    from lightning_modules.lit_nxtp import EvaluationConfig, LitNXTP
    from lightning_modules.locate import ViewGeometry, locate
    from lightning_modules.nxtp import NXTPConfig
    from lightning_modules.sampling import recognize
    from lightning_modules.vision import VisionConfig

    torch.manual_seed(0)
    decoder = DecoderConfig(
        config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=256,
        )
    )
    module = LitNXTP(
        NXTPConfig(VisionConfig(model_name="nxtp-tiny-vit"), decoder, str(llama_tokenizer_dir)),
        evaluation=EvaluationConfig(semantic_metric=False, log_images=2),
    ).eval()
    model = module.model
    images = []
    experiment = types.SimpleNamespace(add_image=lambda tag, picture, step, dataformats: images.append((tag, picture)))
    trainer = types.SimpleNamespace(
        logger=types.SimpleNamespace(experiment=experiment), global_step=3, is_global_zero=True
    )
    (shown,) = [c for c in module.configure_callbacks() if isinstance(c, ValidationPredictions)]
    pixels = torch.randn(2, 3, 64, 64)
    batch = Batch(pixels, None, [["cat"], ["dog"]], ["a", "b"])
    with torch.inference_mode():
        predictions = recognize(model, pixels, topk=3)
        shown.on_validation_batch_end(trainer, module, predictions, batch, 0)
        shown.on_validation_batch_end(trainer, module, predictions, batch, 1)  # the first batch only
    ((tag, picture),) = images
    maps = explain(model, pixels, [[label for label, _ in p[:3]] for p in predictions])
    view = pixels_to_image(model, pixels[0])
    expected = caption_tile(
        view,
        ["cat"],
        predictions[0][:5],
        [(m.label, overlay(view, m.grid, min_size=1, scale_bar=False)) for m in maps[0]],
        [
            (m.label, p, locate(m.grid, ViewGeometry.of(view.size, view.size)))
            for m, (_, p) in zip(maps[0], predictions[0])
        ],
    )
    # the boxes are drawn: the tile differs from one without them
    plain = caption_tile(view, ["cat"], predictions[0][:5])
    assert not np.array_equal(np.asarray(plain)[:160], np.asarray(expected)[:160])
    assert tag == "val/predictions" and picture.shape[1] == 2 * expected.width
    assert np.array_equal(picture[: expected.height, : expected.width], np.asarray(expected))
    assert len(maps[0]) == min(3, len(predictions[0])) > 0
