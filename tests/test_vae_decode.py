"""adjointdpm.vae.decode: checkpointed decoding has the plain decode's gradient; tiled decoding is differentiable
(checkpointed or not, the same gradient), one tile is the plain decode, and tiles blend seamlessly."""

import pytest
import torch

from adjointdpm.vae import decode


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(8, 8), scaling_factor=0.5)
    return vae.double().eval()


def grads(vae, latents, weight, **kw):
    latents = latents.clone().requires_grad_()
    vae.zero_grad(set_to_none=True)
    image = decode(vae, latents, **kw)
    (image * weight[..., : image.shape[-2], : image.shape[-1]]).sum().backward()
    flat = torch.cat([p.grad.flatten() for p in vae.decoder.parameters() if p.grad is not None])
    return image.detach(), latents.grad, flat


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(2)
    return tiny_vae(), torch.randn(1, 4, 12, 16, dtype=torch.float64, generator=g), \
        torch.randn(1, 3, 24, 32, dtype=torch.float64, generator=g)


def test_checkpointed_decode_equals_plain(data):
    vae, latents, weight = data
    plain = grads(vae, latents, weight, checkpoint=False)
    torch.testing.assert_close(plain[0], vae.decode(latents / 0.5).sample.detach())  # unscaled by scaling_factor
    calls = []
    handle = vae.decoder.up_blocks[-1].resnets[0].conv1.register_forward_hook(lambda *a: calls.append(1))
    got = grads(vae, latents, weight, checkpoint=True)
    handle.remove()
    assert len(calls) == 2  # the block ran in the forward pass and again in the backward pass
    for a, b in zip(got, plain):
        assert rel(a, b) <= 1e-12
    assert all("forward" not in m.__dict__ for m in vae.modules())  # the blocks are restored


def test_tiled_decode(data):
    vae, latents, weight = data
    plain = grads(vae, latents, weight, checkpoint=False)
    whole = grads(vae, latents, weight, tile=16, checkpoint=True)  # one tile covers the latent: the plain decode
    for a, b in zip(whole, plain):
        assert rel(a, b) <= 1e-12
    tiled = grads(vae, latents, weight, tile=8, overlap=2, checkpoint=False)
    tiled_ckpt = grads(vae, latents, weight, tile=8, overlap=2, checkpoint=True)
    for a, b in zip(tiled_ckpt, tiled):
        assert rel(a, b) <= 1e-12
    assert tiled[0].shape == plain[0].shape
    assert 0 < rel(tiled[0], plain[0]) < 0.5  # a tiled decode is close to, not equal to, the plain one
    # the gradient of the tiled decode, by finite differences along a random direction
    g = torch.Generator().manual_seed(4)
    v = torch.randn(latents.shape, dtype=latents.dtype, generator=g)
    with torch.no_grad():
        up = (decode(vae, latents + 1e-6 * v, tile=8, overlap=2) * weight).sum()
        down = (decode(vae, latents - 1e-6 * v, tile=8, overlap=2) * weight).sum()
    fd = ((up - down) / 2e-6).item()
    assert abs(fd - (tiled[1] * v).sum().item()) <= 1e-6 * abs(fd)


def test_blending_is_a_partition_of_unity():
    """A decoder that upsamples a constant gives the same constant whatever the tiling."""

    class Constant(torch.nn.Module):
        decoder = torch.nn.Identity()

        def decode(self, z):
            out = torch.nn.functional.interpolate(z[:, :3], scale_factor=4)
            return type("Out", (), {"sample": out})()

    z = torch.full((1, 4, 10, 14), 0.7, dtype=torch.float64)
    image = decode(Constant(), z, tile=4, overlap=1, scaled=False)
    torch.testing.assert_close(image, torch.full((1, 3, 40, 56), 0.7, dtype=torch.float64))


def test_bad_arguments(data):
    vae, latents, _ = data
    with pytest.raises(ValueError, match="overlap"):
        decode(vae, latents, tile=4, overlap=4)
    with pytest.raises(ValueError, match="latents must be"):
        decode(vae, latents[0])
