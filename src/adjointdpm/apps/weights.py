"""Training a model's denoising network: all its weights or peft LoRA adapters, and writing the result as
diffusers loads it back.

:func:`trainable_weights` makes the network's weights (``lora_rank = 0``) or LoRA adapters of rank r on the
attention projections and the ResNet convolutions (``lora_rank = r``, initialised from ``seed``) trainable and
returns them by name; :func:`save_weights` writes a LoRA as diffusers' ``pytorch_lora_weights.safetensors``
(``pipe.load_lora_weights(out)``) and full weights as the pipeline's ``unet/`` (or ``transformer/``) folder
(``from_pretrained(out / "unet")``); :func:`load_weights` puts either back into loaded components (what
``adjointdpm sample --lora DIR`` does).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import UserInputError

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]
LORA_FILE = "pytorch_lora_weights.safetensors"


def network_part(comps) -> str:
    """The pipeline's component name of the denoising network: "unet" or "transformer"."""
    return "unet" if comps.unet is not None else "transformer"


def saved_weights_call(comps, lora_rank: int) -> dict:
    """What :func:`save_weights` wrote into an output folder, as ``pipeline_call``'s keywords: the LoRA in the
    folder itself (``lora="."``), or the network's own folder (``components={"unet": "unet"}``)."""
    if lora_rank > 0:
        return {"lora": ".", "components": None}
    part = network_part(comps)
    return {"lora": None, "components": {part: part}}


def trainable_weights(comps, lora_rank: int, seed: int) -> dict[str, torch.nn.Parameter]:
    """The parameters to optimise, by name: LoRA adapters of rank ``lora_rank`` added to the network (> 0),
    else every weight of it."""
    network = comps.network
    if lora_rank > 0:
        from peft import LoraConfig

        lora_saver(comps.pipeline_config.get("_class_name"), comps.unet is not None)  # fail before training
        torch.manual_seed(seed)
        network.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian",
                                       target_modules=LORA_TARGETS))
        params = {n: p for n, p in network.named_parameters() if p.requires_grad}
    else:
        network.requires_grad_(True)
        params = dict(network.named_parameters())
    if not params:
        raise UserInputError("no trainable weights were found (LoRA found no target modules?)")
    return params


def save_weights(comps, out: Path, lora_rank: int) -> dict[str, str]:
    """Write the trained network (LoRA or full weights) into ``out``; return {name: relative path}."""
    network = comps.network
    part = network_part(comps)
    if lora_rank > 0:
        from peft.utils import get_peft_model_state_dict

        saver = lora_saver(comps.pipeline_config.get("_class_name"), part == "unet")
        layers = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(network).items()}
        saver.save_lora_weights(out, **{f"{part}_lora_layers": layers,
                                        f"{part}_lora_adapter_metadata": network.peft_config["default"].to_dict()},
                                weight_name=LORA_FILE, safe_serialization=True)
        return {"lora": LORA_FILE}
    network.save_pretrained(out / part, safe_serialization=True)
    return {part: f"{part}/"}


def lora_saver(pipeline_class: str | None, is_unet: bool):
    """The diffusers pipeline class whose ``save_lora_weights`` writes this family's LoRA format."""
    import diffusers

    cls = getattr(diffusers, pipeline_class or "", None)
    if cls is not None and hasattr(cls, "save_lora_weights"):
        return cls
    if is_unet:
        return diffusers.StableDiffusionPipeline  # the embedded model and SD 1.x/2.x layouts
    raise UserInputError(f"diffusers has no LoRA format for {pipeline_class} (it cannot load one back); "
                         "use --lora-rank 0 to fine-tune the full weights, written as a transformer/ folder")


def load_weights(comps, folder) -> str:
    """Load what :func:`save_weights` wrote in ``folder`` into ``comps``' network: a LoRA
    (``pytorch_lora_weights.safetensors``, through diffusers' ``load_lora_adapter``, the loader
    ``pipe.load_lora_weights`` uses) or full weights (its ``unet/`` or ``transformer/`` folder). Returns
    "lora" or the part name. One line naming the fix when the folder holds neither."""
    folder = Path(folder).expanduser()
    part = network_part(comps)
    lora, full = folder / LORA_FILE, folder / part
    if lora.is_file():
        comps.network.load_lora_adapter(str(folder), weight_name=LORA_FILE, prefix=part, adapter_name="default")
        return "lora"
    weights = sorted(full.glob("*.safetensors")) if full.is_dir() else []
    if not weights:
        raise UserInputError(f"--lora {folder}: no {LORA_FILE} and no {part}/*.safetensors in it (give the --out "
                             "folder of a finetune or stylize run)")
    from safetensors.torch import load_file

    state = {}
    for f in weights:
        state.update(load_file(str(f), device=str(comps.device)))
    missing, unexpected = comps.network.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserInputError(f"--lora {folder}: its {part}/ weights do not fit this model ({len(missing)} missing, "
                             f"{len(unexpected)} unexpected tensors); give the model it was trained from with --model")
    return part
