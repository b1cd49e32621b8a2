"""Tiny random-weight critic folders for the critic tests (no tests here, only builders), all saved as real
transformers / diffusers folders in safetensors with their image processors:

* ``build_classifier``: ``ResNetForImageClassification`` (3 classes named cat / dog / bird) + a ConvNeXt-style
  image processor (shortest edge 16 with ``crop_pct``: resize to 18, centre-crop 16);
* ``build_clip``: ``CLIPModel`` + the word-level CLIP tokenizer (built offline) + a CLIP image processor;
* ``build_backbone``: a ``ConvNextModel`` (hidden states are feature maps) + its image processor;
* ``add_safety_checker``: diffusers' ``StableDiffusionSafetyChecker`` (``safety_checker/``) and its CLIP image
  processor (``feature_extractor/``) inside a pipeline folder; its thresholds are set so that some of the
  tiny pipeline's images are flagged.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

LABELS = {0: "cat", 1: "dog", 2: "bird"}


def build_classifier(root: Path, seed: int = 0) -> Path:
    from transformers import ConvNextImageProcessorPil, ResNetConfig, ResNetForImageClassification

    torch.manual_seed(seed)
    cfg = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                       num_labels=3, id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    ResNetForImageClassification(cfg).eval().save_pretrained(root, safe_serialization=True)
    ConvNextImageProcessorPil(size={"shortest_edge": 16}, crop_pct=0.875).save_pretrained(root)
    return Path(root)


def _clip_processor(size: int = 16):
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def _clip_config():
    from transformers import CLIPConfig

    from adjointdpm.embedded.text import BOS, EOS, vocab_and_merges

    vocab, _ = vocab_and_merges()
    text = dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16, bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[EOS])
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=16,
                  patch_size=4)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)


def build_clip(root: Path, seed: int = 0) -> Path:
    from transformers import CLIPModel

    from adjointdpm.embedded.text import write_tokenizer

    torch.manual_seed(seed)
    CLIPModel(_clip_config()).eval().save_pretrained(root, safe_serialization=True)
    write_tokenizer(root)
    _clip_processor().save_pretrained(root)
    return Path(root)


def build_backbone(root: Path, seed: int = 0) -> Path:
    from transformers import ConvNextConfig, ConvNextImageProcessorPil, ConvNextModel

    torch.manual_seed(seed)
    cfg = ConvNextConfig(num_channels=3, patch_size=2, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)
    ConvNextModel(cfg).eval().save_pretrained(root, safe_serialization=True)
    ConvNextImageProcessorPil(size={"shortest_edge": 16}, crop_pct=0.875).save_pretrained(root)
    return Path(root)


def add_safety_checker(pipeline: Path, images: torch.Tensor, seed: int = 0) -> Path:
    """Write ``safety_checker/`` + ``feature_extractor/`` into ``pipeline``. The concept embeddings are the
    embeddings of ``images`` (the pipeline's own, in [-1, 1]) and random directions; each threshold sits
    just below the cosine of the first image, so that it (and images like it) are flagged."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    from adjointdpm.critics.preprocess import Preprocess

    torch.manual_seed(seed)
    checker = StableDiffusionSafetyChecker(_clip_config()).eval()
    proc = _clip_processor()
    with torch.no_grad():
        pooled = checker.vision_model(Preprocess(proc)(images))[1]
        e = torch.nn.functional.normalize(checker.visual_projection(pooled), dim=-1)
        concepts = torch.nn.functional.normalize(torch.randn(17, e.shape[1]), dim=-1)
        concepts[0] = e[0]
        cos = e @ concepts.T
        checker.concept_embeds.copy_(concepts)
        checker.concept_embeds_weights.copy_(torch.full((17,), 1.5))  # only concept 0 can flag
        checker.concept_embeds_weights[0] = float(cos[:, 0].median())  # about half the images are flagged
        checker.special_care_embeds.copy_(torch.nn.functional.normalize(torch.randn(3, e.shape[1]), dim=-1))
        checker.special_care_embeds_weights.copy_(torch.full((3,), 1.5))  # never
    checker.save_pretrained(pipeline / "safety_checker", safe_serialization=True)
    proc.save_pretrained(pipeline / "feature_extractor")
    index = json.loads((pipeline / "model_index.json").read_text())
    index.update(safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
                 feature_extractor=["transformers", "CLIPImageProcessor"])
    (pipeline / "model_index.json").write_text(json.dumps(index))
    return pipeline
