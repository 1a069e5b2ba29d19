"""The validation means as plain text (terminal, `make demo`): one line per metric, base beside LoRA.

Reads the `{stage}_{metric}` summary a validation report carries (report.json's `summary`); kept
free of torch so printing it stays instant.
"""

STAGES = {"base": "base", "lora": "LoRA"}


def means_table(summary: dict[str, float]) -> list[str]:
    """`metric  base  LoRA` rows; a metric a stage lacks shows `-`."""
    names = list(dict.fromkeys(key.split("_", 1)[1] for key in summary if key.split("_", 1)[0] in STAGES))
    if not names:
        return ["(no validation metrics)"]
    width = max(len(name) for name in names)
    lines = [f"{'metric':<{width}}  " + "  ".join(f"{title:>10}" for title in STAGES.values())]
    for name in names:
        cells = [summary.get(f"{stage}_{name}") for stage in STAGES]
        lines.append(f"{name:<{width}}  " + "  ".join(f"{'-':>10}" if v is None else f"{v:>10.4f}" for v in cells))
    return lines
