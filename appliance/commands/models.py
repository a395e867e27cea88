"""``appliance models list | calibrate | reset``: thresholds calibrated on the site's own enrolments.

``calibrate`` measures genuine and impostor scores on the protected templates (no DEK is unwrapped),
prints the TAR/FAR table, writes the ROC/DET plot and the JSON report, and stores the run (audited).
It calibrates two thresholds for the same FAR target: a single frame's (per query) and a track's fused
decision (per stranger track, ``vector.calibration.track_scores``). ``--apply`` makes both the model's
thresholds on every API worker within seconds; it is refused (neither applied), with the number of
subjects the target needs, when the data are too few for either.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from appliance.calibration import Measurement

app = typer.Typer(no_args_is_help=True, help="Face-embedding models and their calibrated thresholds.")


def _connect():  # type: ignore[no-untyped-def]
    """The settings and a service-role connection (the role the API runs as: INSERT-only on thresholds)."""
    import psycopg

    from appliance.commands.context import load_settings

    settings = load_settings()
    conn = psycopg.connect(settings.database_url.get_secret_value(), autocommit=True,
                           connect_timeout=int(settings.db_connect_timeout) or 1)
    return settings, conn


@app.command("list")
def list_models() -> None:
    """Each configured model, its dimension and the threshold that applies (and where it came from)."""
    from appliance.calibration import applied_thresholds, source_of, thresholds_of

    settings, conn = _connect()
    with conn:
        found = applied_thresholds(conn)
    for name, spec in settings.models.items():
        row = found.get(name)
        value, fused = thresholds_of(row, spec.threshold, spec.fused_threshold)
        typer.echo(f"{name:20} dim {spec.dim:4}  threshold {value:.4f}  track {fused:.4f}  ({source_of(row)})")


@app.command("calibrate")
def calibrate(
    model: Annotated[str, typer.Option(help="A configured model, e.g. dlib-resnet-v1.")],
    target_far: Annotated[float, typer.Option(min=1e-9, max=0.5, help="False-accept rate to promise (per query).")]
    = 1e-3,
    apply: Annotated[bool, typer.Option("--apply", help="Make the calibrated threshold the model's threshold.")]
    = False,
    out: Annotated[Path, typer.Option(help="Folder for the PNG and JSON report.")] = Path("calibration"),
) -> None:
    """Measure TAR/FAR on the enrolled data, print the table, write PNG + JSON; --apply stores the threshold."""
    from appliance import calibration, clients
    from appliance.audit.cli_support import cli_actor
    from appliance.commands.context import fail
    from vector.calibration import InsufficientData, plot, table, track_table

    settings, conn = _connect()
    spec = settings.models.get(model)
    if spec is None:
        fail(f"unknown model {model!r}; configured: {', '.join(settings.models)}")
    actor = cli_actor()
    with conn:
        m = calibration.measure(conn, model, spec.dim, target_far, settings.track_min_frames, settings.track_window)
        typer.echo(table(m.report))
        if m.track is not None:
            typer.echo(track_table(m.track, m.track_tar, settings.track_min_frames, settings.track_window))
        try:
            version = calibration.record(conn, m, actor, apply)
        except InsufficientData as exc:
            version = calibration.record(conn, m, actor, apply=False)  # the refused run is kept, audited
            _write(out, model, m)
            fail(f"refused to apply: {exc}; enrol more people or choose a higher target "
                 f"(calibration v{version} stored, not applied)", code=2)
    png = _write(out, model, m)
    plot(m.report, png, f"{model}: {m.report.subjects} subjects, {m.report.encodings} encodings")
    if m.track is not None:
        plot(m.track, png.with_name(f"{png.stem}-track.png"),
             f"{model}, fused tracks: {m.track.impostor_trials} stranger, {m.track.genuine_pairs} genuine 3-frame")
    chosen = m.report.chosen
    if chosen is None:
        typer.echo(f"no threshold meets FAR {target_far:g}: {m.report.refused}")
    else:
        typer.echo(f"threshold for FAR ≤ {target_far:g} (95 % upper bound {chosen.far_upper_bound:.2e}): "
                   f"{chosen.threshold:.4f}, TAR {chosen.tar:.2%}")
    fused = m.track.chosen if m.track is not None else None
    if fused is None:
        typer.echo(f"no track threshold meets FAR {target_far:g}: {m.track.refused if m.track else 'not measured'}")
    else:
        typer.echo(f"track threshold for FAR ≤ {target_far:g} per stranger track (95 % upper bound "
                   f"{fused.far_upper_bound:.2e}): {fused.threshold:.4f}, TAR {fused.tar:.2%} (3 frames)")
    typer.echo(f"wrote {png}, {png.stem}-track.png and {png.with_suffix('.json')}")
    if apply:
        told = calibration.notify(clients.redis_client(settings), model)
        typer.echo(f"applied as {model} v{version}; API workers use it "
                   + ("now" if told else f"within {settings.model_threshold_refresh_interval:g} s (Redis is down)"))
    else:
        typer.echo(f"stored as calibration v{version} (not applied; re-run with --apply to use it)")


def _write(out: Path, model: str, m: Measurement) -> Path:
    from appliance.calibration import report_json

    out.mkdir(parents=True, exist_ok=True)
    (out / f"calibration-{model}.json").write_text(report_json(m))
    return out / f"calibration-{model}.png"


@app.command("reset")
def reset(model: Annotated[str, typer.Option(help="A configured model.")]) -> None:
    """Go back to the configured default thresholds (versioned and audited like an apply)."""
    from appliance import calibration, clients
    from appliance.audit.cli_support import cli_actor
    from appliance.commands.context import fail

    settings, conn = _connect()
    if model not in settings.models:
        fail(f"unknown model {model!r}; configured: {', '.join(settings.models)}")
    with conn:
        version = calibration.reset(conn, model, cli_actor())
    calibration.notify(clients.redis_client(settings), model)
    spec = settings.models[model]
    typer.echo(f"{model}: back to the configured defaults {spec.threshold} (track {spec.fused_threshold}) "
               f"(v{version})")
