"""Encoder caches: prompt embeddings (with the references) and VAE latents, encoded incrementally."""

import dagster as dg
import pandas as pd

from qwen_edit_assets.launchpad import load_for_run
from qwen_edit_assets.metadata import readable_size
from qwen_edit_assets.scope import SINGLE, ProjectScope

GROUP = "caches"
TEXT_DESCRIPTION = (
    "Qwen2.5-VL prompt embeddings computed as the diffusers pipeline's encode_prompt does (edit-v1: the "
    "conditioning image embeds), one safetensors file per sample; only new or changed pairs are encoded."
)
VAE_DESCRIPTION = (
    "Normalised VAE latents of each target (at its bucket size) and its references, one safetensors file "
    "per sample; only new or changed pairs are encoded, removed pairs are pruned."
)


def cache_assets(scope: ProjectScope = SINGLE) -> list[dg.AssetsDefinition]:
    """text_embeds and vae_latents of one project: never partitioned, a sweep's points all read them."""
    return [_cache_asset("text", "text_embeds", TEXT_DESCRIPTION, scope), _cache_asset("vae", "vae_latents", VAE_DESCRIPTION, scope)]


def _cache_asset(kind: str, name: str, description: str, scope: ProjectScope = SINGLE) -> dg.AssetsDefinition:
    check = f"{name}_match_manifest"
    key = scope.key(name)

    @dg.asset(
        key=key,
        group_name=scope.group(GROUP),
        pool=scope.pool,
        ins={"pairing_manifest": dg.AssetIn(key=scope.key("pairing_manifest"))},
        required_resource_keys={scope.resource_key},
        tags=scope.tags,
        kinds={"pytorch", "safetensors"},
        description=description,
        check_specs=[dg.AssetCheckSpec(check, asset=key, description="every manifest row has an up-to-date cache file")],
    )
    def cache_asset(context: dg.AssetExecutionContext, pairing_manifest: pd.DataFrame):
        from trainer.data.caches import build_text_cache, build_vae_cache, verify_cache
        from trainer.data.versions import cache_version

        # e.g. the Launchpad's flavour: the caches the training reads
        loaded = load_for_run(context, scope.project(context), op_name=scope.op_name("trained_lora"))
        build = build_text_cache if kind == "text" else build_vae_cache
        stats = build(pairing_manifest, loaded.dataset_config, loaded.config)
        context.log.info(f"{name}: {stats.encoded} encoded, {stats.reused} reused, {stats.pruned} pruned")
        # from the cache files' own keys: the UI shows downstream staleness exactly when a file changed
        version = cache_version(pairing_manifest, loaded.dataset_config, loaded.config, kind)
        metadata = {**stats.as_metadata(), "size_mb": readable_size(_folders_size(stats.folders))}
        yield dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(version))
        problems = verify_cache(pairing_manifest, loaded.dataset_config, loaded.config, kind)
        yield dg.AssetCheckResult(
            check_name=check,
            passed=not problems,
            metadata={"problems": dg.MetadataValue.md("\n".join(f"- {p}" for p in problems[:50]) or "none"), "count": len(problems)},
        )

    return cache_asset


def _folders_size(folders) -> int:
    from pathlib import Path

    return sum(p.stat().st_size for folder in folders for p in Path(folder).glob("*.safetensors") if p.is_file())


text_embeds, vae_latents = cache_assets(SINGLE)  # the single project's
