"""bitsandbytes on a CUDA GPU: an nf4 base (`base_model_precision: nf4-bnb`) and the 8-bit AdamW
(`optimizer: adamw8bit`), through the functions training uses. The CPU suite cannot run these
(bitsandbytes quantises on GPUs only; both settings are refused there with a clear error), so
they skip without a GPU; run them on the GPU machine (benchmarks/README.md gives the command).
"""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes needs a CUDA GPU")

STEPS = 30


def test_an_nf4_base_trains_a_lora_with_adamw8bit_that_loads_into_a_full_precision_pipeline(tiny_model, tmp_path):
    import bitsandbytes as bnb
    from diffusers import QwenImageEditPlusPipeline
    from PIL import Image

    from tests.gpu.conftest import CUDA, a_sample, config_for
    from trainer.model.loading import load_transformer
    from trainer.model.lora import adapter_metadata, add_lora, lora_state_dict, save_lora
    from trainer.training.distributed import make_optimizer
    from trainer.training.loss import flow_matching_loss

    config = config_for(tiny_model, base_model_precision="nf4-bnb", optimizer="adamw8bit", learning_rate=1e-2)
    transformer = load_transformer(config, torch.bfloat16).to(CUDA)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in transformer.modules()), "the base is not 4-bit"
    params = add_lora(transformer, config.lora_rank, config.lora_scale_alpha, config.seed)
    optimizer = make_optimizer(config, params)
    assert isinstance(optimizer, bnb.optim.AdamW8bit)

    sample, g = a_sample(), torch.Generator().manual_seed(1)
    sigma = torch.tensor([0.6], device=CUDA)
    noise = torch.randn((1, *sample.target.shape), generator=g).to(CUDA)
    losses = []
    for _ in range(STEPS):  # one sample, one σ, one noise: the LoRA must fit it
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = flow_matching_loss(transformer, sample, sigma, noise, torch.bfloat16)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses

    lora_file = save_lora(QwenImageEditPlusPipeline, lora_state_dict(transformer), adapter_metadata(transformer), tmp_path / "lora")
    lora_dir = lora_file.parent
    pipe = QwenImageEditPlusPipeline.from_pretrained(str(tiny_model), dtype=torch.bfloat16).to(CUDA)  # unquantised
    pipe.set_progress_bar_config(disable=True)
    reference = Image.new("RGB", (64, 64), (200, 30, 30))

    def edit():
        return pipe(image=[reference], prompt="make the square green", height=64, width=64, num_inference_steps=2,
                    generator=torch.Generator().manual_seed(0), output_type="latent").images

    base = edit()
    pipe.load_lora_weights(str(lora_dir))
    assert not torch.allclose(base.float(), edit().float(), atol=1e-3)
    print(f"nf4 + adamw8bit: loss {losses[0]:.4f} -> {losses[-1]:.4f} in {STEPS} steps")
