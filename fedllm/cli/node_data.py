"""Node operator commands about the node's own data and state: `node init`, `node scan`.

Both run on the operator's machine only and print nothing that leaves it; `scan` shows masked
examples (placeholders in place of identifiers), never a detected value.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.table import Table

from fedllm.cli.common import USER_ERRORS, HomeOpt, JsonOpt, err, node_app
from fedllm.cli.common import console as make_console
from fedllm.config import load_node_config
from fedllm.sealed import SealedDir, SealedError, create_key_file, load_key

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="the node's node.toml")]


@node_app.command("init")
def init(config: ConfigOpt, home: HomeOpt = None) -> None:
    """Create the node's state folder and its operator key (0600) sealing the node's state."""
    from fedllm.node import deployed_node

    try:
        cfg = load_node_config(config)
        identity, _ = deployed_node(cfg, home, base_dir=Path(config).resolve().parent)
        assert identity.key_file is not None
        if identity.key_file.exists():
            # Idempotent for an initialised node; never a new key (it would orphan the state).
            SealedDir(identity.state_dir, load_key(identity.key_file))
            made = False
        else:
            SealedDir.initialise(identity.state_dir, create_key_file(identity.key_file))
            made = True
    except (*USER_ERRORS, SealedError) as e:
        raise err(str(e)) from None
    c = make_console()
    c.print(f"node {cfg.node.name}: state {identity.state_dir}")
    c.print(f"key {identity.key_file} ({'created, mode 0600' if made else 'already present'})")
    if made:
        c.print("[yellow]back up the key file: without it the node's sealed privacy ledgers "
                "cannot be opened, and the node will refuse to train[/]")


@node_app.command("scan")
def scan(
    config: ConfigOpt,
    examples: Annotated[int, typer.Option("--examples", "-n", min=0,
                                          help="masked examples to show")] = 3,
    as_json: JsonOpt = False,
) -> None:
    """Preview, on this machine only, what the node's redaction and per-user cap would do to
    its data: counts per entity type and a few masked examples (never the detected values)."""
    from fedllm.data import read_table
    from fedllm.pii import build_redactor, redact_texts

    try:
        cfg = load_node_config(config)
        d = cfg.data
        table = read_table(d.path, text_column=d.text_column, label_column=None,
                           max_examples=d.max_examples, user_column=d.user_column)
        red = cfg.redaction
        redactor = build_redactor(red) if red.enabled else None
    except USER_ERRORS as e:
        raise err(str(e)) from None
    res = redact_texts(redactor, table.texts) if redactor else None
    cap = cfg.contribution.max_examples_per_user
    users: dict[str, int | None] = {"users": None, "largest_user": None, "rows_after_cap": None}
    if table.user_ids is not None:
        counts = np.unique(np.asarray(table.user_ids), return_counts=True)[1]
        users = {"users": len(counts), "largest_user": int(counts.max()),
                 "rows_after_cap": int(np.minimum(counts, cap).sum()) if cap else len(table)}
    masked = [{"line": table.lines[i], "text": res.texts[i][:200]}
              for i in (res.rows_changed[:examples] if res else [])]
    out = {"file": d.path, "rows": len(table), "redaction": red.enabled,
           "counts": res.counts if res else {},
           "rows_with_pii": len(res.rows_changed) if res else 0,
           "notes": redactor.notes if redactor else [], "max_examples_per_user": cap,
           **users, "examples": masked}
    if as_json:
        print(json.dumps(out, indent=2))
        return
    c = make_console()
    c.print(f"[bold]{d.path}[/]: {len(table)} rows (shown on this machine only)")
    if not red.enabled:
        c.print("[bold red]redaction is OFF for this node (redaction.enabled = false)[/]")
    elif res is not None:
        t = Table(title="would be redacted")
        t.add_column("entity")
        t.add_column("count", justify="right")
        for ent, n in res.counts.items():
            t.add_row(ent, str(n))
        c.print(t)
        c.print(f"{len(res.rows_changed)} of {len(table)} rows contain something to redact")
        for note in out["notes"]:
            c.print(f"[yellow]note: {note}[/]")
        for ex in masked:
            c.print(f"  line {ex['line']}: {ex['text']}", markup=False)
    if table.user_ids is None:
        c.print("no user column: user-level ε will be reported as unknown")
    else:
        c.print(f"{users['users']} users, the largest has {users['largest_user']} rows; "
                + (f"cap {cap} per user keeps {users['rows_after_cap']} rows" if cap
                   else "no per-user cap: user-level ε will be reported as unknown"))
