"""``appliance subject``: erase a subject (resumable, signed receipt), export a subject's data."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from appliance.state import AppState

app = typer.Typer(no_args_is_help=True, help="GDPR: erase or export one subject.")


def _state() -> AppState:
    from appliance.commands.context import load_settings
    from appliance.state import AppState

    return AppState.build(load_settings())


@app.command()
def erase(
    subject_id: Annotated[uuid.UUID, typer.Argument(help="The subject's id.")],
    receipt_out: Annotated[Path | None, typer.Option("--receipt", help="Write the signed receipt (JSON) here.")] = None,
) -> None:
    """Erase a subject (or resume its unfinished erasure) and print the signed receipt."""
    from appliance.audit.cli_support import cli_actor
    from appliance.errors import ApplianceError
    from appliance.gdpr import erasure

    state = _state()
    try:
        job_id = erasure.start_erasure(state, subject_id, cli_actor(), None)
        job = erasure.run_erasure(state, job_id)
    except ApplianceError as exc:
        typer.secho(f"erasure failed: {exc.detail}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from exc
    finally:
        state.close()
    out = {"job_id": str(job["id"]), "receipt": job["receipt"], "signature": job["receipt_signature"]}
    text = json.dumps(out, indent=2, default=str)
    if receipt_out:
        receipt_out.write_text(text + "\n")
    typer.echo(text)


@app.command("verify-receipt")
def verify_receipt(
    file: Annotated[Path, typer.Argument(help="The JSON body of DELETE /v1/subjects/{id} or GET /v1/erasures/{id}, "
                                              "the output of `subject erase`, or a {receipt, signature} file.")],
    public_key: Annotated[Path, typer.Option(help="The appliance's public key (PEM), obtained separately.")],
) -> None:
    """Check an erasure receipt offline against a pinned key.

    Exit 0: valid; 1: invalid (changed, another key, or unsigned fields that contradict it);
    2: nothing checkable (unreadable file or key, no receipt yet, no or two different signatures).
    """
    from appliance.gdpr.receipts import check_receipt_document

    try:
        check = check_receipt_document(json.loads(file.read_text()), public_key.read_bytes())
    except (OSError, ValueError) as exc:  # json.JSONDecodeError and ReceiptDocumentError are ValueErrors
        typer.secho(f"CANNOT CHECK: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from exc
    if not check.ok:
        for problem in check.problems:
            typer.secho(f"INVALID: {problem}", fg=typer.colors.RED)
        raise typer.Exit(1)
    receipt = check.receipt
    typer.echo(f"OK: receipt of job {receipt['job_id']} for subject {receipt['subject_id']}, erased at "
               f"{receipt.get('erased_at')}, signed by key {receipt['signing_key_id']}")


@app.command()
def export(
    subject_id: Annotated[uuid.UUID, typer.Argument(help="The subject's id.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Write the signed zip here.")],
) -> None:
    """Write the access/portability export (decrypted data, audit history, signature) to a zip."""
    from appliance.audit.cli_support import cli_actor
    from appliance.errors import ApplianceError
    from appliance.gdpr.export import access_archive

    state = _state()
    try:
        with out.open("wb") as f:
            for chunk in access_archive(state, subject_id, cli_actor(), None):
                f.write(chunk)
    except ApplianceError as exc:
        out.unlink(missing_ok=True)
        typer.secho(f"export failed: {exc.detail}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from exc
    finally:
        state.close()
    out.chmod(0o600)
    typer.echo(f"exported to {out}")
