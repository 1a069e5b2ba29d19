"""Compare the latest MLflow runs of an experiment: what changed, what it did to the loss and the edits.

    comparison = compare_runs(tracking_uri, "qwen-edit", last_n=5, out_dir=Path("outputs/comparison"))
    write_comparison_report(comparison, Path("outputs/comparison"))   # report.md + report.html + grids

Only `mlflow.tracking.MlflowClient` is used, so it works the same on the embedded sqlite store
and on a tracking server. Runs are listed oldest first (one column each).
"""

import html
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from trainer.errors import QwenEditError
from trainer.tracking.loss_summary import FINAL_LOSS, final_loss
from trainer.tracking.store import compare_url, redact_url

LOSS = "train_loss"
VALIDATION_PREFIX = "validation_"
VALIDATION_IMAGES = "validation/images"  # where log_to_mlflow puts the final validation's images
LORA_SUFFIX = "_lora.png"
TARGET_SUFFIX = "_target.png"


@dataclass
class RunRow:
    run_id: str
    name: str
    start_time: datetime
    status: str
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.name} ({self.run_id[:8]})" if self.name else self.run_id[:8]


@dataclass
class Comparison:
    tracking_uri: str
    experiment_name: str
    experiment_id: str
    runs: list[RunRow]  # oldest first
    differing_params: dict[str, list[str | None]]  # param -> its value in each run (None: not logged)
    metrics: dict[str, list[float | None]]  # final_loss_mean_last_10pct, train_loss_best, validation_* (latest value)
    images: dict[str, list[Path | None]]  # eval pair -> each run's LoRA edit, downloaded
    targets: dict[str, Path]  # eval pair -> its target image
    compare_url: str
    image_dir: Path

    def metric(self, name: str) -> dict[str, float | None]:
        """One metric by run id."""
        return dict(zip((r.run_id for r in self.runs), self.metrics.get(name, [None] * len(self.runs))))

    def param(self, name: str) -> dict[str, str | None]:
        """One differing param by run id."""
        return dict(zip((r.run_id for r in self.runs), self.differing_params.get(name, [None] * len(self.runs))))

    def runs_table(self) -> str:
        lines = ["| run | name | started (UTC) | status |", "|---|---|---|---|"]
        for run in self.runs:
            lines.append(f"| `{run.run_id}` | {run.name} | {run.start_time:%Y-%m-%d %H:%M:%S} | {run.status} |")
        return "\n".join(lines)

    def table(self) -> str:
        """Differing params, then the metrics, one column per run (a markdown table)."""
        header = "| | " + " | ".join(run.label for run in self.runs) + " |"
        lines = [header, "|---" * (len(self.runs) + 1) + "|"]
        for name, values in self.differing_params.items():
            lines.append(f"| {name} | " + " | ".join("-" if v is None else v for v in values) + " |")
        for name, values in self.metrics.items():
            lines.append(f"| {name} | " + " | ".join(_number(v) for v in values) + " |")
        return "\n".join(lines)


def _number(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.6g}"


def compare_runs(tracking_uri: str, experiment_name: str, last_n: int = 5, out_dir: Path | None = None) -> Comparison:
    """The `last_n` most recently started runs of the experiment, side by side.

    Validation images (`validation/images/*_lora.png`, logged after training) are downloaded
    under `out_dir/images/<run id>/` (a temporary folder without `out_dir`).
    """
    if last_n < 1:
        raise QwenEditError(f"last_n must be at least 1, got {last_n}")
    client, experiment = _experiment(tracking_uri, experiment_name)
    found = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=last_n)
    if not found:
        raise QwenEditError(f"the MLflow experiment {experiment_name!r} at {redact_url(tracking_uri)} has no runs")
    return _comparison(client, tracking_uri, experiment, list(reversed(found)), out_dir)


def compare_latest_by_tag(
    tracking_uri: str, experiment_name: str, tag: str, values: list[str], out_dir: Path | None = None
) -> Comparison:
    """The latest run of each value of `tag` (a sweep's points: one run per partition key), in the order of
    `values`; a value without a run yet is left out. Values must not hold quotes (MLflow's filter syntax)."""
    client, experiment = _experiment(tracking_uri, experiment_name)
    found = []
    for value in values:
        latest = client.search_runs(
            [experiment.experiment_id], filter_string=f"tags.{tag} = '{value}'",
            order_by=["attributes.start_time DESC"], max_results=1,
        )
        found += latest
    if not found:
        raise QwenEditError(
            f"the MLflow experiment {experiment_name!r} at {redact_url(tracking_uri)} has no run tagged {tag} "
            f"(one of {', '.join(values)}) yet: materialise those partitions first"
        )
    return _comparison(client, tracking_uri, experiment, found, out_dir)


def _experiment(tracking_uri: str, experiment_name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        names = sorted(e.name for e in client.search_experiments())
        there = f"the experiments there: {', '.join(names)}" if names else "it has no experiments yet (train a run first)"
        raise QwenEditError(
            f"no MLflow experiment {experiment_name!r} at {redact_url(tracking_uri)}; {there}. Pick one with --experiment NAME"
        )
    return client, experiment


def _comparison(client, tracking_uri: str, experiment, found: list, out_dir: Path | None) -> Comparison:
    runs = [
        RunRow(
            run_id=r.info.run_id,
            name=r.info.run_name or "",
            start_time=datetime.fromtimestamp(r.info.start_time / 1000, tz=timezone.utc),
            status=r.info.status,
            params=dict(r.data.params),
            tags={k: v for k, v in r.data.tags.items() if not k.startswith("mlflow.")},
        )
        for r in found
    ]
    if out_dir is None:
        import tempfile

        out_dir = Path(tempfile.mkdtemp(prefix="qwen-edit-compare-"))
    image_dir = Path(out_dir) / "images"
    metrics = _metrics(client, found)
    images, targets = _download_images(client, runs, image_dir)
    return Comparison(
        tracking_uri=redact_url(tracking_uri),  # shown in reports and logs: no credentials
        experiment_name=experiment.name,
        experiment_id=experiment.experiment_id,
        runs=runs,
        differing_params=_differing(runs),
        metrics=metrics,
        images=images,
        targets=targets,
        compare_url=compare_url(tracking_uri, [experiment.experiment_id], [r.run_id for r in runs]),
        image_dir=image_dir,
    )


@dataclass
class Ranked:
    rank: int  # 1 is best; runs without the metric come last, unranked (0)
    run: RunRow
    value: float | None


def rank_runs(comparison: Comparison, metric: str, higher_is_better: bool) -> list[Ranked]:
    """The compared runs best first on `metric` (its latest value); a run that lacks it comes last, unranked."""
    values = comparison.metric(metric)
    known = [run for run in comparison.runs if _finite(values[run.run_id])]
    known.sort(key=lambda run: values[run.run_id], reverse=higher_is_better)
    ranked = [Ranked(i + 1, run, values[run.run_id]) for i, run in enumerate(known)]
    return ranked + [Ranked(0, run, None) for run in comparison.runs if run not in known]


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def ranking_table(ranked: list[Ranked], metric: str, higher_is_better: bool, tag: str) -> str:
    """| rank | <tag> | metric | run |, best first (a markdown table)."""
    better = "higher" if higher_is_better else "lower"
    lines = [f"| rank | {tag} | {metric} ({better} is better) | run |", "|---|---|---|---|"]
    for row in ranked:
        lines.append(f"| {row.rank or '-'} | {row.run.tags.get(tag, '-')} | {_number(row.value)} | {row.run.label} |")
    return "\n".join(lines)


def _differing(runs: list[RunRow]) -> dict[str, list[str | None]]:
    keys = sorted({key for run in runs for key in run.params})
    table = {key: [run.params.get(key) for run in runs] for key in keys}
    return {key: values for key, values in table.items() if len(set(values)) > 1}


def _latest(history) -> float | None:
    """The value logged last (by time, then step): a post-training validation logged without a
    step beats a mid-training one at step N, unlike MLflow's own "latest" (highest step)."""
    if not history:
        return None
    return max(history, key=lambda m: (m.timestamp, m.step)).value


def _metrics(client, found) -> dict[str, list[float | None]]:
    validation = sorted({k for r in found for k in r.data.metrics if k.startswith(VALIDATION_PREFIX)})
    metrics: dict[str, list[float | None]] = {FINAL_LOSS: [], f"{LOSS}_best": []}
    metrics.update({key: [] for key in validation})
    for run in found:
        losses = client.get_metric_history(run.info.run_id, LOSS) if LOSS in run.data.metrics else []
        metrics[FINAL_LOSS].append(_final_loss(run, losses))
        metrics[f"{LOSS}_best"].append(min(m.value for m in losses) if losses else None)
        for key in validation:
            history = client.get_metric_history(run.info.run_id, key) if key in run.data.metrics else []
            metrics[key].append(_latest(history))
    return metrics


def _final_loss(run, losses) -> float | None:
    """The run's own FINAL_LOSS metric; for a run logged before it existed, the same mean from its history
    (one value per step: the last logged, as a resumed run may have logged a step twice)."""
    if FINAL_LOSS in run.data.metrics:
        return run.data.metrics[FINAL_LOSS]
    by_step = {m.step: m.value for m in sorted(losses, key=lambda m: (m.step, m.timestamp))}
    return final_loss([by_step[step] for step in sorted(by_step)]) if by_step else None


def _download_images(client, runs: list[RunRow], image_dir: Path) -> tuple[dict[str, list[Path | None]], dict[str, Path]]:
    per_run: list[dict[str, Path]] = []
    targets: dict[str, Path] = {}
    for run in runs:
        artifacts = [a.path for a in client.list_artifacts(run.run_id, VALIDATION_IMAGES) if not a.is_dir]
        destination = image_dir / run.run_id
        destination.mkdir(parents=True, exist_ok=True)
        found: dict[str, Path] = {}
        for path in artifacts:
            name = Path(path).name
            if name.endswith(LORA_SUFFIX):
                found[name[: -len(LORA_SUFFIX)]] = Path(client.download_artifacts(run.run_id, path, str(destination)))
            elif name.endswith(TARGET_SUFFIX) and name[: -len(TARGET_SUFFIX)] not in targets:
                targets[name[: -len(TARGET_SUFFIX)]] = Path(client.download_artifacts(run.run_id, path, str(destination)))
        per_run.append(found)
    pairs = sorted({pair for found in per_run for pair in found})
    return {pair: [found.get(pair) for found in per_run] for pair in pairs}, targets


# -- the report --------------------------------------------------------------------------------


def _text(draw, xy: tuple[int, int], text: str, fill: str) -> None:
    try:
        draw.text(xy, text, fill=fill)
    except UnicodeEncodeError:  # Pillow's bitmap fallback font is latin-1 only
        draw.text(xy, text.encode("latin-1", "replace").decode("latin-1"), fill=fill)


def write_grid(comparison: Comparison, pairs: list[str], path: Path, cell: int = 160) -> Path:
    """One line per eval pair (named on the left), one column per run (its LoRA edit), the target last."""
    from PIL import Image, ImageDraw

    labels = [run.label for run in comparison.runs] + ["target"]
    header, margin = 28, 64
    grid = Image.new("RGB", (margin + len(labels) * cell, header + len(pairs) * cell), "white")
    draw = ImageDraw.Draw(grid)
    for x, label in enumerate(labels):
        text = label if len(label) <= cell // 6 else label[: cell // 6 - 3] + "..."
        _text(draw, (margin + x * cell + 4, 8), text, "black")
    for y, pair in enumerate(pairs):
        top = header + y * cell
        _text(draw, (4, top + cell // 2), pair[:10], "black")
        cells = [*comparison.images.get(pair, [None] * len(comparison.runs)), comparison.targets.get(pair)]
        for x, image_path in enumerate(cells):
            if image_path is None:
                _text(draw, (margin + x * cell + 4, top + cell // 2), "(no image)", "gray")
                continue
            with Image.open(image_path) as image:
                grid.paste(image.convert("RGB").resize((cell, cell)), (margin + x * cell, top))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def grid_paths(out_dir: Path, comparison: Comparison) -> dict[str, Path]:
    return {pair: Path(out_dir) / f"grid_{pair}.png" for pair in comparison.images}


def write_comparison_report(comparison: Comparison, out_dir: Path) -> Path:
    """report.md (returned) and report.html beside it, a grid per eval pair and `grid.png` with all of them."""
    from trainer.io import atomic_write_text

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    grids = {pair: write_grid(comparison, [pair], path) for pair, path in grid_paths(out_dir, comparison).items()}
    if grids:
        write_grid(comparison, list(grids), out_dir / "grid.png")

    def rel(path: Path) -> str:
        try:
            return str(Path(path).resolve().relative_to(out_dir.resolve()))
        except ValueError:
            return str(Path(path).resolve())

    title = f"MLflow run comparison: {comparison.experiment_name} ({len(comparison.runs)} runs)"
    note = "" if comparison.differing_params else "\n\nAll params are equal across these runs.\n"
    md = [
        f"# {title}",
        f"[Open in the MLflow compare page]({comparison.compare_url}) (tracking URI `{comparison.tracking_uri}`)",
        "## Runs",
        comparison.runs_table(),
        "## Differing params and metrics" + note,
        comparison.table(),
        "## Validation edits (LoRA), one column per run",
    ]
    md += [f"### {pair}\n\n![{pair}]({rel(path)})" for pair, path in grids.items()] or ["(no validation images logged)"]
    report = out_dir / "report.md"
    atomic_write_text(report, "\n\n".join(md) + "\n")

    def html_table(markdown: str) -> str:
        rows = [line.strip("|").split("|") for line in markdown.splitlines() if not line.startswith("|---")]
        cells = [
            "<tr>" + "".join(f"<{'th' if i == 0 else 'td'}>{html.escape(c.strip().strip('`'))}</{'th' if i == 0 else 'td'}>" for c in row) + "</tr>"
            for i, row in enumerate(rows)
        ]
        return "<table border=1 cellpadding=4>" + "".join(cells) + "</table>"

    body = [
        f"<h1>{html.escape(title)}</h1>",
        f'<p><a href="{html.escape(comparison.compare_url)}">Open in the MLflow compare page</a> '
        f"(tracking URI <code>{html.escape(comparison.tracking_uri)}</code>)</p>",
        "<h2>Runs</h2>", html_table(comparison.runs_table()),
        "<h2>Differing params and metrics</h2>", html_table(comparison.table()),
        "<h2>Validation edits (LoRA), one column per run</h2>",
    ]
    body += [f'<h3>{html.escape(pair)}</h3><img src="{html.escape(rel(path))}">' for pair, path in grids.items()] or [
        "<p>(no validation images logged)</p>"
    ]
    atomic_write_text(out_dir / "report.html", "<html><body>" + "".join(body) + "</body></html>")
    return report
