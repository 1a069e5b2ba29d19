"""Encoder caches: prompt embeddings (with the references) and VAE latents, encoded incrementally."""

import dagster as dg
import pandas as pd

from qwen_edit_assets.resources import QwenEditProject

GROUP = "caches"


@dg.asset(
    group_name=GROUP,
    pool="gpu",
    kinds={"pytorch", "safetensors"},
    description="Qwen2.5-VL prompt embeddings computed as the diffusers pipeline's encode_prompt does "
    "(edit-v1: the conditioning image embeds), one safetensors file per sample; only new or changed pairs are encoded.",
)
def text_embeds(context: dg.AssetExecutionContext, project: QwenEditProject, pairing_manifest: pd.DataFrame) -> dg.MaterializeResult:
    from trainer.caches import build_text_cache

    loaded = project.load()
    stats = build_text_cache(pairing_manifest, loaded.dataset_config, loaded.config)
    context.log.info(f"text embeddings: {stats.encoded} encoded, {stats.reused} reused, {stats.pruned} pruned")
    return dg.MaterializeResult(metadata=stats.as_metadata())


@dg.asset(
    group_name=GROUP,
    pool="gpu",
    kinds={"pytorch", "safetensors"},
    description="Normalised VAE latents of each target (at its bucket size) and its references, one "
    "safetensors file per sample; only new or changed pairs are encoded.",
)
def vae_latents(context: dg.AssetExecutionContext, project: QwenEditProject, pairing_manifest: pd.DataFrame) -> dg.MaterializeResult:
    from trainer.caches import build_vae_cache

    loaded = project.load()
    stats = build_vae_cache(pairing_manifest, loaded.dataset_config, loaded.config)
    context.log.info(f"VAE latents: {stats.encoded} encoded, {stats.reused} reused, {stats.pruned} pruned")
    return dg.MaterializeResult(metadata=stats.as_metadata())
