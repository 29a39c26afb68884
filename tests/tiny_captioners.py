"""Tiny random-weight captioning models built locally from the real config classes (no download).

Each is saved in the same folder layout as its Hugging Face repo, so the captioners load them
through exactly the code that loads the real ones.
"""

from __future__ import annotations

import csv
from pathlib import Path

from PIL import Image

SEED = 1234
BLIP_SIZE = 32
FLORENCE_SIZE = 32  # a 32 px image gives (32 / 4)^2 + 1 = 65 image tokens from the tiny vision tower
WD14_SIZE = 64

# name, category (0 general, 4 character, 9 rating), bias. Probabilities are sigmoid(bias) for every image,
# except "blue_theme", which follows the mean of the blue channel (the model's first input channel: BGR).
WD14_TAGS = [
    ("general", 9, 2.0),
    ("sensitive", 9, -1.0),
    ("questionable", 9, -3.0),
    ("explicit", 9, -4.0),
    ("long_hair", 0, 3.0),  # 0.95
    ("smile", 0, 0.4),  # 0.60
    ("^_^", 0, 0.0),  # 0.50: a kaomoji keeps its underscore
    ("blue_sky", 0, -1.5),  # 0.18: below the default threshold
    ("blue_theme", 0, -4.0),  # 0.98 for a blue image, 0.02 for a red one
    ("hatsune_miku", 4, 2.2),  # 0.90: above the character threshold
    ("kagamine_rin", 4, 1.0),  # 0.73: below it
]


def build_tiny_blip(folder: Path) -> Path:
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessorPil,
        BlipProcessor,
    )

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"a an the cat dog red blue photo of on in with".split()]
    words += list("abcdefghijklmnopqrstuvwxyz")
    tokenizer = BertTokenizer(vocab={word: i for i, word in enumerate(words)}, bos_token="[DEC]")
    processor = BlipProcessor(BlipImageProcessorPil(size={"height": BLIP_SIZE, "width": BLIP_SIZE}), tokenizer)
    ids = {"bos_token_id": tokenizer.bos_token_id, "sep_token_id": tokenizer.sep_token_id,
           "eos_token_id": tokenizer.sep_token_id, "pad_token_id": tokenizer.pad_token_id}
    config = BlipConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 16, "encoder_hidden_size": 16,
                     "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
                     "max_position_embeddings": 64, **ids},
        vision_config={"hidden_size": 16, "image_size": BLIP_SIZE, "patch_size": 8, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "intermediate_size": 32},
        projection_dim=16,
    )
    torch.manual_seed(SEED)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build_tiny_florence(folder: Path) -> Path:
    import torch
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import (
        BartTokenizer,
        CLIPImageProcessorPil,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
    )

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for char in sorted(ByteLevel.alphabet()):  # byte-level BPE with every byte and no merges
        vocab[char] = len(vocab)
    tokenizer = BartTokenizer(vocab=vocab, merges=[], extra_special_tokens={"image_token": "<image>"})
    size = {"height": FLORENCE_SIZE, "width": FLORENCE_SIZE}
    image_processor = CLIPImageProcessorPil(size=size, crop_size=size, do_center_crop=False,
                                            image_seq_length=(FLORENCE_SIZE // 4) ** 2 + 1)
    processor = Florence2Processor(image_processor=image_processor, tokenizer=tokenizer)
    config = Florence2Config(
        text_config={"model_type": "bart", "vocab_size": len(tokenizer), "d_model": 16, "encoder_layers": 1,
                     "decoder_layers": 1, "encoder_attention_heads": 1, "decoder_attention_heads": 1,
                     "encoder_ffn_dim": 16, "decoder_ffn_dim": 16, "max_position_embeddings": 256,
                     "bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 2,
                     "forced_bos_token_id": 0},
        vision_config={"depths": [1], "patch_size": [7], "patch_stride": [4], "patch_padding": [3],
                       "patch_prenorm": [False], "embed_dim": [16], "num_heads": [1], "num_groups": [1],
                       "window_size": 4, "projection_dim": 16},
        image_token_id=tokenizer.image_token_id,
    )
    torch.manual_seed(SEED)
    model = Florence2ForConditionalGeneration(config)
    with torch.no_grad():  # special tokens score 0 while random words score up to ~1: the text is never empty
        special = [i for i in range(len(tokenizer)) if i < 4 or i >= len(vocab)]
        model.get_input_embeddings().weight[special] = 0.0
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build_tiny_wd14(folder: Path) -> Path:
    """``model.onnx`` + ``selected_tags.csv`` like SmilingWolf/wd-*-tagger-v3: NHWC BGR 0..255 in, probabilities out."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "selected_tags.csv", "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["tag_id", "name", "category", "count"])
        for i, (name, category, _) in enumerate(WD14_TAGS):
            writer.writerow([1000 + i, name, category, 500 - i])
    rng = np.random.default_rng(SEED)
    weights = (rng.standard_normal((3, len(WD14_TAGS))) * 1e-5).astype(np.float32)
    weights[0, [name for name, _, _ in WD14_TAGS].index("blue_theme")] = 8.0 / 255.0
    bias = np.array([b for _, _, b in WD14_TAGS], dtype=np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["input"], ["mean"], axes=[1, 2], keepdims=0),
            helper.make_node("MatMul", ["mean", "weights"], ["logits"]),
            helper.make_node("Add", ["logits", "bias"], ["biased"]),
            helper.make_node("Sigmoid", ["biased"], ["output"]),
        ],
        "tiny_tagger",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", WD14_SIZE, WD14_SIZE, 3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", len(WD14_TAGS)])],
        initializer=[numpy_helper.from_array(weights, "weights"), numpy_helper.from_array(bias, "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, folder / "model.onnx")
    return folder


def make_images(folder: Path, names_and_colors: dict[str, tuple[int, int, int]], size=(48, 32)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, color in names_and_colors.items():
        path = folder / name
        Image.new("RGB", size, color).save(path)
        paths.append(path)
    return paths
