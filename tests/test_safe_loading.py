"""Weights load only through safetensors: a pickle file is refused with an explanation and never executed."""
import pickle
import shutil
from pathlib import Path

import pytest

from _tiny_sd import build_tiny_sd
from adjointdpm.components import ComponentsError, load_components


class _Payload:
    """Unpickling this runs ``Path(marker).touch()``: proof of execution if the marker appears."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def poisoned_folder(tmp_path):
    root = build_tiny_sd(tmp_path / "sd")
    marker = tmp_path / "PICKLE_WAS_EXECUTED"
    unet = root / "unet"
    for weights in unet.glob("*.safetensors"):
        weights.unlink()
    with open(unet / "diffusion_pytorch_model.bin", "wb") as f:
        pickle.dump({"weight": _Payload(marker)}, f)
    # sanity: the payload does execute when unpickled, so its absence below means it was never loaded
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(probe)))
    assert probe.exists()
    return root, marker


def test_pickle_weights_are_refused_and_never_executed(poisoned_folder):
    root, marker = poisoned_folder
    with pytest.raises(ComponentsError, match=r"pickle weights are not loaded: convert to safetensors"):
        load_components(root)
    assert not marker.exists(), "the pickle payload ran"


def test_ckpt_beside_safetensors_is_ignored(tmp_path):
    root = build_tiny_sd(tmp_path / "sd")
    marker = tmp_path / "PICKLE_WAS_EXECUTED"
    with open(root / "unet" / "diffusion_pytorch_model.bin", "wb") as f:
        pickle.dump(_Payload(marker), f)
    shutil.copy(root / "unet" / "diffusion_pytorch_model.bin", root / "unet" / "model.ckpt")
    components = load_components(root)
    assert components.unet is not None
    assert not marker.exists()
