"""CLI verb ``ufm designs``: the dashboard's kept designs (feature + setup, which may hold typed
private text), listed or forgotten."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ufm.cli.common import add_home, finite_float, open_store


def cmd_designs_list(a: argparse.Namespace) -> int:
    from ufm.core.designs import list_designs

    with open_store(a) as store:
        files = list_designs(store.home)
    if not files:
        print(f"no designs kept in {store.home}", file=sys.stderr)
    for p in files:
        print(p.stem)
    return 0


def cmd_designs_forget(a: argparse.Namespace) -> int:
    from ufm.core.designs import forget_designs

    with open_store(a) as store:
        n = forget_designs(store.home, a.older_than)
    print(f"forgot {n} design{'s' if n != 1 else ''}" + (f" untouched for {a.older_than:g} days" if a.older_than
                                                        is not None else ""))
    return 0


def register(sub: Any) -> None:
    """Add ``designs`` to the ``ufm`` subcommands."""
    p = sub.add_parser("designs", help="list or forget the dashboard's kept designs (they may hold typed text)",
                       description="The dashboard keeps each feature design (with its setup) under the ufm home so "
                                   "a reload or a link brings it back; typed text can be private.")
    ds = p.add_subparsers(dest="designs_command", metavar="ACTION", required=True)
    q = ds.add_parser("list", help="the kept design ids, oldest first")
    q.set_defaults(func=cmd_designs_list)
    q = ds.add_parser("forget", help="delete the kept designs (links to them stop working)")
    q.add_argument("--older-than", type=finite_float, default=None, metavar="DAYS",
                   help="only designs untouched for DAYS days")
    q.set_defaults(func=cmd_designs_forget)
    for q in ds.choices.values():
        add_home(q)
