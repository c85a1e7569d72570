"""`locaudit data`: the built-in datasets, where this machine has them, and how to get them.

Data are found under one layout (e.g. truthfulqa/data/v1/TruthfulQA.csv) in: $LOCAUDIT_DATA, else the
repository's sibling ../shared/data, else the cache ($LOCAUDIT_CACHE/data), where `locaudit data get`
downloads them from their public sources, checking each file's sha256.
"""

from __future__ import annotations

import json
from typing import List, Optional

import typer

EXAMPLE = (
    "Examples:\n\n"
    "  locaudit data                                  # every dataset: licence, where found, checksum, source\n\n"
    "  locaudit data get truthfulqa                   # every TruthfulQA file into the cache (also: caa, rome, all)\n\n"
    "  locaudit data get caa-sycophancy --url-base http://mirror/data   # from a mirror of the data layout\n\n"
    "  locaudit collect --data truthfulqa:$(locaudit data path truthfulqa-v1) --out runs/acts"
)

data_app = typer.Typer(help=(__doc__ or "") + "\n\n" + EXAMPLE, no_args_is_help=False, invoke_without_command=True,
                       add_completion=False)


def _rows(verify: bool = True) -> list[dict]:
    from locaudit.data.registry import DATASETS, locate

    out = []
    for d in DATASETS.values():
        f = locate(d, verify=verify)
        out.append({"name": d.name, "group": d.group, "licence": d.licence, "status": f.status, "where": f.where,
                    "path": str(f.path) if f.path else None, "sha256": d.sha256, "size": d.size, "source": d.url,
                    "description": d.description})
    return out


def _roots_line() -> str:
    from locaudit.data.registry import ENV, roots

    parts = [f"{w} = {r}{'' if r.is_dir() else ' (absent)'}" for w, r in roots()]
    if not any(w.startswith("$") for w, _ in roots()):
        parts.insert(0, f"${ENV} unset")
    return "Data roots, searched in order: " + "; ".join(parts)


def list_command(as_json: bool = typer.Option(False, "--json", help="One JSON object per dataset, one per line."),
                 verify: bool = typer.Option(True, "--verify/--no-verify", help="Check every local file's sha256.")) -> None:
    """List every built-in dataset: licence, where it was found (and whether its checksum matches), source."""
    rows = _rows(verify)
    if as_json:
        for r in rows:
            typer.echo(json.dumps(r))
        return
    typer.echo(_roots_line())
    w = max(len(r["name"]) for r in rows)
    for r in rows:
        where = f"{r['where']}: {r['path']}" if r["path"] else "missing"
        flag = "" if r["status"] in ("ok", "unchecked", "missing") else f" [{r['status'].upper()}]"
        typer.echo(f"{r['name']:<{w}}  {r['status']:<8} {where}{flag}")
        typer.echo(f"{'':<{w}}  licence {r['licence']}; sha256 {r['sha256'][:16]}..; {r['size']:,} bytes; {r['source']}")
    missing = sum(r["status"] == "missing" for r in rows)
    if missing:
        typer.echo(f"{missing} dataset(s) missing: `locaudit data get truthfulqa|caa|rome|all|NAME` downloads them "
                   "into the cache.")


@data_app.callback()
def data_root(ctx: typer.Context,
              as_json: bool = typer.Option(False, "--json", help="One JSON object per dataset, one per line.")) -> None:
    if ctx.invoked_subcommand is None:
        list_command(as_json=as_json, verify=True)


@data_app.command("list")
def list_cmd(as_json: bool = typer.Option(False, "--json", help="One JSON object per dataset, one per line."),
             verify: bool = typer.Option(True, "--verify/--no-verify", help="Check every local file's sha256.")) -> None:
    """List every built-in dataset (the same as `locaudit data`)."""
    list_command(as_json, verify)


@data_app.command("get")
def get_command(names: List[str] = typer.Argument(..., help="Dataset names or groups: truthfulqa, caa, rome, all."),
                url_base: Optional[str] = typer.Option(None, "--url-base", help="Download from URL_BASE/PATH (a mirror of "
                                                       "the data layout, e.g. a local server) instead of each source."),
                force: bool = typer.Option(False, "--force", help="Download even where a good copy exists."),
                timeout: float = typer.Option(60.0, "--timeout", help="Seconds per request."),
                as_json: bool = typer.Option(False, "--json", help="One JSON object per dataset, one per line.")) -> None:
    """Download datasets from their public sources into the cache, checking each file's sha256."""
    from locaudit.data.registry import expand, fetch

    for d in expand(names):
        f = fetch(d, url_base=url_base, force=force, timeout=timeout)
        if as_json:
            typer.echo(json.dumps({"name": d.name, "status": f.status, "where": f.where, "path": str(f.path),
                                   "sha256": d.sha256}))
        else:
            typer.echo(f"{d.name}: {f.status} ({f.where}) {f.path}")


@data_app.command("path")
def path_command(name: str = typer.Argument(..., help="A dataset name (see `locaudit data`).")) -> None:
    """Print the local file of a dataset (for scripts), or fail saying how to get it."""
    from locaudit.data.registry import path

    typer.echo(str(path(name)))


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data", help="Built-in datasets: list them (licence, source, checksum, where "
                  "found), `get` them into the cache, print a `path`.")
