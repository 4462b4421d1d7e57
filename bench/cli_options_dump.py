"""Click's view of every command as JSON: each option's names, default, type (choices, range), flags and help.

Run before and after a change to the CLI's options and diff the two files: every option, default and choice
that moved shows up (issue 32: the options generated from the config spec must match the hand-written ones).

    python bench/cli_options_dump.py > before.json; ...; python bench/cli_options_dump.py > after.json
    python bench/cli_options_dump.py --diff before.json after.json
"""
from __future__ import annotations

import json
import sys

import click


def _type(t: click.ParamType) -> dict:
    out = {"name": t.name, "class": type(t).__name__}
    if isinstance(t, click.Choice):
        out["choices"] = list(t.choices)
    for bound in ("min", "max", "min_open", "max_open", "file_okay", "dir_okay", "exists"):
        if hasattr(t, bound):
            out[bound] = getattr(t, bound)
    return out


def _param(p: click.Parameter) -> dict:
    default = p.default if isinstance(p.default, (str, int, float, bool, type(None), list, tuple)) else repr(p.default)
    out = {"kind": type(p).__name__, "opts": list(p.opts), "secondary_opts": list(p.secondary_opts), "default": default,
           "type": _type(p.type), "required": p.required, "multiple": p.multiple, "nargs": p.nargs,
           "metavar": p.metavar}
    if isinstance(p, click.Option):
        out.update(is_flag=p.is_flag, flag_value=p.flag_value if p.is_flag else None, count=p.count,
                   show_default=p.show_default, help=p.help)
    return out


def dump(group: click.Group) -> dict:
    commands = {"(group)": group, **dict(sorted(group.commands.items()))}
    return {name: {"help": cmd.help, "params": {p.name: _param(p) for p in cmd.params}}
            for name, cmd in commands.items()}


def diff(before: dict, after: dict) -> list[str]:
    """One line per command, option or attribute that differs."""
    lines = []
    for cmd in sorted(set(before) | set(after)):
        if cmd not in before or cmd not in after:
            lines.append(f"{cmd}: only {'after' if cmd in after else 'before'}")
            continue
        b, a = before[cmd]["params"], after[cmd]["params"]
        if before[cmd]["help"] != after[cmd]["help"]:
            lines.append(f"{cmd}: command help changed")
        if list(b) != list(a) and set(b) == set(a):
            lines.append(f"{cmd}: option order {list(b)} -> {list(a)}")
        for name in sorted(set(b) | set(a)):
            if name not in b or name not in a:
                lines.append(f"{cmd} {name}: only {'after' if name in a else 'before'}")
                continue
            for key in sorted(set(b[name]) | set(a[name])):
                if b[name].get(key) != a[name].get(key):
                    lines.append(f"{cmd} {name}.{key}: {b[name].get(key)!r} -> {a[name].get(key)!r}")
    return lines


def main(argv: list[str]) -> None:
    if argv[:1] == ["--diff"]:
        before, after = (json.load(open(p)) for p in argv[1:3])
        print("\n".join(diff(before, after)) or "no difference")
        return
    from pipeline.cli import cli

    print(json.dumps(dump(cli), indent=1, sort_keys=False, default=repr))


if __name__ == "__main__":
    main(sys.argv[1:])
