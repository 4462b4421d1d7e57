"""The unknown threshold's share kept, as a person reads it: fit-head's and train's log line
(``trust.fit_trust``) and their results (``reports.present``) print the one text. Torch-free: the CLI's
presenter imports it."""
from __future__ import annotations


def kept_text(trust: dict) -> str:
    """What the threshold kept, counted on the rows it was set on and naming them ('keeps 760 of 800
    held-out photos (95%; asked 95%): 93 of 100 validation rows, 667 of 700 training rows scored against
    the others'); fit-head's and train's log line says the same (they once gave '93.0% of 100 val rows'
    and '760 of 800 held-out photos (95%)', two true figures of different rows, neither named). A record
    made before the share was measured says the share asked; one before ``val_known_kept`` (the validation
    rows' share, None without them) leaves out the parts."""
    if "known_kept" not in trust:
        return f"set to keep {trust['known_share']:.0%} of held-out photos"
    n = trust["held_out_rows"]
    kept = round(trust["known_kept"] * n)
    text = f"keeps {kept} of {n} held-out photos ({trust['known_kept']:.0%}; asked {trust['known_share']:.0%})"
    if "val_known_kept" not in trust:
        return text
    train, val = trust["known_rows"], n - trust["known_rows"]
    val_kept = round(trust["val_known_kept"] * val) if val else 0
    parts = [f"{val_kept} of {val} validation rows"] if val else []
    return f"{text}: {', '.join(parts + [f'{kept - val_kept} of {train} training rows scored against the others'])}"
