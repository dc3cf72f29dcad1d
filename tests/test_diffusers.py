"""diffusers models from tiny configs: UNet2DModel, UNet2DConditionModel (cross-attention), AutoencoderKL, a DiT and
SD3's transformer, and a DDPM pipeline's denoising loop run with a pruned UNet (the setting of Diff-Pruning).

Each model is masked at ratio 0.5 (L1 norm) and exported: fewer parameters, a layer of the kind named in its case
narrower, soft == hard on fresh inputs (another batch size, other timesteps).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import diffusers
import pytest
import torch
from maskprune.algorithms import L1Norm
from torch import nn
from zoo import _randomize_zero_parameters

import maskprune
from maskprune import Mask

pytestmark = pytest.mark.usefixtures("one_thread")


def _noise(*shape: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=generator)


def _timesteps(batch: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 1000, (batch,), generator=generator)


def _unet_inputs(batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {"sample": _noise(batch, 3, 16, 16, generator=generator), "timestep": _timesteps(batch, generator)}


def _conditioned_unet_inputs(batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "sample": _noise(batch, 4, 16, 16, generator=generator),
        "timestep": _timesteps(batch, generator),
        "encoder_hidden_states": _noise(batch, 5, 24, generator=generator),  # 5 tokens of a width-24 text encoder
    }


def _image(batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {"sample": _noise(batch, 3, 16, 16, generator=generator)}


def _dit_inputs(batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "hidden_states": _noise(batch, 4, 8, 8, generator=generator),
        "timestep": _timesteps(batch, generator),
        "class_labels": torch.randint(0, 10, (batch,), generator=generator),
    }


def _sd3_inputs(batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "hidden_states": _noise(batch, 4, 8, 8, generator=generator),
        "encoder_hidden_states": _noise(batch, 5, 24, generator=generator),
        "pooled_projections": _noise(batch, 16, generator=generator),
        "timestep": _timesteps(batch, generator),
    }


@dataclass(frozen=True)
class DiffusersCase:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int, torch.Generator], dict[str, torch.Tensor]]
    narrower: str  # name ending of layers of which at least one must lose output channels


def _unet() -> nn.Module:
    return diffusers.UNet2DModel(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=8,
    )


CASES = [
    DiffusersCase("unet2d", _unet, _unet_inputs, "attentions.0.to_q"),
    DiffusersCase(
        "unet2d_condition",
        lambda: diffusers.UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(16, 32),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=24,
            norm_num_groups=4,
            attention_head_dim=4,
        ),
        _conditioned_unet_inputs,
        "attn2.to_k",  # cross-attention: keys from the text encoder's states lose whole heads
    ),
    DiffusersCase(
        "autoencoder_kl",
        lambda: diffusers.AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(16, 32),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=16,
        ),
        _image,
        "resnets.0.conv1",
    ),
    DiffusersCase(
        "dit",
        lambda: diffusers.DiTTransformer2DModel(
            num_attention_heads=4,
            attention_head_dim=8,
            in_channels=4,
            out_channels=8,
            num_layers=2,
            sample_size=8,
            patch_size=2,
            num_embeds_ada_norm=10,
        ),
        _dit_inputs,
        "attn1.to_q",
    ),
    DiffusersCase(
        "sd3",
        lambda: diffusers.SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=24,
            caption_projection_dim=32,
            pooled_projection_dim=16,
            out_channels=4,
            pos_embed_max_size=16,
        ),
        _sd3_inputs,
        "attn.add_k_proj",  # joint attention: the text stream's keys lose whole heads with the image stream's
    ),
]
BY_NAME = {case.name: case for case in CASES}


def _inputs(case: DiffusersCase, batch: int, seed: int) -> dict[str, torch.Tensor]:
    return case.inputs(batch, torch.Generator().manual_seed(seed))


@functools.cache
def _exported(name: str) -> tuple[nn.Module, nn.Module]:
    """(masked model, exported model), once per process: L1 norm at ratio 0.5."""
    case = BY_NAME[name]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = case.build().eval()
        _randomize_zero_parameters(model)
        mask = Mask(model, _inputs(case, 2, seed=1), algorithm=L1Norm(), ratio=0.5).make()
        assert mask.do_mask()
        return model, mask.generate_pruned_model()  # verified on the example inputs


def _rows(model: nn.Module, ending: str) -> list[int]:
    rows = [m.weight.shape[0] for n, m in model.named_modules() if n.endswith(ending)]
    assert rows, f"no {ending} in {type(model).__name__}"
    return rows


@pytest.mark.parametrize("name", list(BY_NAME))
def test_diffusers_model_soft_equals_hard(name: str) -> None:
    case = BY_NAME[name]
    model, pruned = _exported(name)
    assert maskprune.count_parameters(pruned) < maskprune.count_parameters(model)
    before, after = _rows(model, case.narrower), _rows(pruned, case.narrower)
    assert any(b < a for a, b in zip(before, after, strict=True)), f"no {case.narrower} lost a channel: {after}"
    result = maskprune.verify(model, pruned, _inputs(case, 3, seed=2))
    assert result.ok and result.scale > 0, f"{name}: {result}"


@pytest.mark.parametrize("name", ["unet2d", "autoencoder_kl"])
def test_up_and_downsamplers_lose_channels_and_say_so(name: str) -> None:
    """``Upsample2D`` and ``Downsample2D`` check ``x.shape[1] == self.channels`` in their forward: the export sets
    ``channels`` where it equals their inputs' pruned width, so the channels entering them are pruned too."""
    model, pruned = _exported(name)
    samplers = (diffusers.models.upsampling.Upsample2D, diffusers.models.downsampling.Downsample2D)
    before = {n: m.channels for n, m in model.named_modules() if isinstance(m, samplers)}
    after = {n: m.channels for n, m in pruned.named_modules() if isinstance(m, samplers)}
    assert before and after.keys() == before.keys()
    assert any(after[n] < before[n] for n in before), after
    for n, m in pruned.named_modules():
        if isinstance(m, samplers) and m.conv is not None:
            assert m.conv.in_channels == m.channels, n


def _ddpm_images(unet: nn.Module, steps: int) -> torch.Tensor:
    pipeline = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(num_train_timesteps=steps))
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        images = pipeline(batch_size=2, generator=generator, num_inference_steps=steps, output_type="np").images
    return torch.as_tensor(images)


def test_ddpm_pipeline_denoises_with_the_pruned_unet() -> None:
    model, pruned = _exported("unet2d")
    masked_images, pruned_images = _ddpm_images(model, steps=4), _ddpm_images(pruned, steps=4)
    assert pruned_images.shape == (2, 16, 16, 3)  # batch, height, width, RGB
    inside = (pruned_images > 0) & (pruned_images < 1)  # the pipeline clamps to [0, 1]: compare unclamped pixels
    assert inside.float().mean() > 0.5, "most pixels clamped: the comparison would prove little"
    torch.testing.assert_close(pruned_images, masked_images, rtol=1e-4, atol=1e-5)
