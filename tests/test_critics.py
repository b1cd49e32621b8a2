"""Critics from local folders and plug-in losses, unit by unit (tiny random models, CPU, a few seconds):
the torch preprocessing equals the folder's transformers image processor, classes by index or label name,
pickle-only folders refused unread, the safety checker's differentiable scores flag exactly what diffusers'
checker flags, and every plug-in contract failure is one line naming its cause."""
from __future__ import annotations

import pickle
import re

import numpy as np
import pytest
import torch

from _tiny_critics import add_safety_checker, build_backbone, build_classifier, build_clip


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("critics")
    return {"classifier": build_classifier(root / "cls"), "clip": build_clip(root / "clip"),
            "backbone": build_backbone(root / "bb")}


def _processor_output(folder, arr):
    from PIL import Image
    from transformers import AutoImageProcessor

    proc = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    return torch.from_numpy(np.asarray(proc(Image.fromarray(arr), return_tensors="np")["pixel_values"]))


@pytest.mark.parametrize("kind", ["classifier", "clip"])
def test_preprocessing_equals_the_image_processor(folders, kind):
    from adjointdpm.critics.classifier import Classifier
    from adjointdpm.critics.clip import Clip

    critic = (Classifier if kind == "classifier" else Clip).from_folder(folders[kind])
    rng = np.random.default_rng(0)
    # CLIP at its own size only rescales / crops / normalises: exact; otherwise (the classifier's crop_pct always
    # resizes, 16 -> 18 -> crop 16) torch's antialiased bicubic against PIL's, on 8-bit pixels
    exact = ((16, 16, 3), 1e-5, 1e-6) if kind == "clip" else ((16, 16, 3), 0.15, 0.01)
    for shape, tol_max, tol_mean in (exact, ((20, 26, 3), 0.15, 0.01)):
        arr = (rng.random(shape) * 255).astype(np.uint8)
        ref = _processor_output(folders[kind], arr)
        ours = critic.preprocess(torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 127.5 - 1)
        assert ours.shape == ref.shape
        diff = (ours - ref).abs()
        assert diff.max() <= tol_max and diff.mean() <= tol_mean, (shape, diff.max(), diff.mean())
    x = torch.rand(2, 3, 20, 26, requires_grad=True)
    critic.preprocess(x * 2 - 1).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # differentiable


def test_classifier_targets_by_index_or_label(folders):
    from adjointdpm.critics import CriticError, folder_kind
    from adjointdpm.critics.classifier import Classifier

    c = Classifier.from_folder(folders["classifier"])
    assert (c.class_index("dog"), c.class_index("BIRD"), c.class_index(0), c.class_index("2")) == (1, 2, 0, 2)
    with pytest.raises(CriticError, match="no class named 'horse'"):
        c.class_index("horse")
    with pytest.raises(CriticError, match="out of range"):
        c.class_index(3)
    assert c(torch.zeros(2, 1, 12, 12)).shape == (2, 3)  # greyscale, any size
    assert (folder_kind(folders["classifier"], "--judge"), folder_kind(folders["clip"], "--judge")) == ("classifier", "clip")


@pytest.mark.parametrize("kind", ["backbone", "clip"])  # feature maps (ConvNeXt) and tokens (CLIP's vision tower)
def test_backbone_grams_and_style_loss(folders, kind):
    from adjointdpm.critics.backbone import Backbone, GramStyle

    b = Backbone.from_folder(folders[kind])
    ref = torch.rand(1, 3, 16, 16) * 2 - 1
    style = GramStyle(b, ref)
    assert float(style(ref)) == pytest.approx(0.0, abs=1e-10)
    x = (torch.rand(3, 3, 16, 16) * 2 - 1).requires_grad_(True)
    style.calibrate(x.detach())
    assert float(style(x.detach()).mean()) == pytest.approx(1.0, rel=1e-5)
    style(x).sum().backward()
    assert x.grad.abs().sum() > 0


def test_pickle_only_folders_are_refused_unread(tmp_path):
    from adjointdpm.critics import CriticError
    from adjointdpm.critics.classifier import Classifier

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('pickle payload ran')",))

    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text('{"architectures": ["ResNetForImageClassification"]}')
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(CriticError, match="found only pytorch_model.bin .pickle weights are never loaded"):
        Classifier.from_folder(folder)
    with pytest.raises(CriticError, match="does not exist"):
        Classifier.from_folder(tmp_path / "missing")
    with pytest.raises(CriticError, match="has no config.json"):
        Classifier.from_folder(tmp_path)


def test_safety_scores_flag_what_diffusers_flags(tmp_path):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    from adjointdpm.critics.safety import SafetyChecker

    torch.manual_seed(0)
    images = torch.rand(8, 3, 16, 16) * 2 - 1
    (tmp_path / "model_index.json").write_text("{}")
    add_safety_checker(tmp_path, images)
    checker = SafetyChecker.from_pipeline(tmp_path)
    flags = checker.flag(images)
    reference = StableDiffusionSafetyChecker.from_pretrained(tmp_path / "safety_checker").eval()
    _, nsfw = reference(clip_input=checker.preprocess(images), images=images.clone().numpy())
    assert flags.tolist() == list(nsfw) and 0 < int(flags.sum()) < len(flags)
    x = images.clone().requires_grad_(True)
    checker.attack_loss(x, margin=0.02).sum().backward()
    assert x.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------- plug-in losses
GOOD = "def loss(images, *, prompts, indices):\n    return (images - 0.5).pow(2).flatten(1).mean(1)\n"
BAD = {
    "shape": ("def loss(images, **context):\n    return images.mean(1)\n", "returned shape (2, 8, 8) for 2 images"),
    "nonfinite": ("def loss(images):\n    return images.mean((1, 2, 3)) / 0.0\n", "returned non-finite values"),
    "detach": ("def loss(images):\n    return images.detach().pow(2).mean((1, 2, 3))\n", "no gradient reaches them"),
    "no_grad": ("import torch\ndef loss(images):\n    with torch.no_grad():\n        return images.pow(2).mean((1, 2, 3))\n",
                "no gradient reaches them"),
    "numpy": ("import torch\ndef loss(images):\n    a = images.detach().numpy()\n    return torch.tensor((a ** 2).mean((1, 2, 3)))\n",
              "no gradient reaches them"),
    "detached_param": ("import torch\nw = torch.ones(1, requires_grad=True)\n"
                       "def loss(images):\n    return images.detach().mean((1, 2, 3)) * w\n", "no gradient reaches the images"),
    "not_tensor": ("def loss(images):\n    return 1.0\n", "returned float, not a torch tensor"),
    "raises": ("def loss(images):\n    raise KeyError('oops')\n", "raised KeyError"),
}


def test_plugin_loss_contract(tmp_path):
    from adjointdpm.critics import CriticError
    from adjointdpm.critics.plugin import CheckedLoss

    images = torch.rand(2, 3, 8, 8, requires_grad=True)
    (tmp_path / "good.py").write_text(GOOD)
    good = CheckedLoss.from_spec(f"{tmp_path / 'good.py'}:loss")
    out = good(images * 2 - 1, prompts=["a", "b"], indices=[0, 1])
    assert out.shape == (2,) and good.checked
    out.sum().backward()
    assert images.grad.abs().sum() > 0  # the real call stays in the graph
    scalar = CheckedLoss(lambda x: x.pow(2).mean(), "scalar")
    assert scalar(images, prompts=["a", "b"], indices=[0, 1]).shape == (2,)
    seen = {}
    CheckedLoss(lambda x, prompts: seen.setdefault("p", prompts) and x.sum(), "ctx")(images, prompts=["p", "q"], indices=[4, 5])
    assert seen["p"] == ["p", "q"]  # only the context keywords it takes
    assert CheckedLoss.from_spec("torch.nn.functional:softsign").fn is torch.nn.functional.softsign  # module:FUNC
    for name, (code, message) in BAD.items():
        (tmp_path / f"{name}.py").write_text(code)
        bad = CheckedLoss.from_spec(f"{tmp_path / name}.py:loss")
        with pytest.raises(CriticError, match=re.escape(message)) as err:
            bad(images, prompts=["a", "b"], indices=[0, 1])
        assert "\n" not in str(err.value), name
    for spec, message in ((f"{tmp_path / 'good.py'}:nope", "has no function nope"), ("nofile.py:f", "does not exist"),
                          ("loss", "write FILE.py:FUNC"), ("no_such_module_xyz:f", "cannot import")):
        with pytest.raises(CriticError, match=re.escape(message)):
            CheckedLoss.from_spec(spec)
