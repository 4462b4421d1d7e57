"""What each run leaves behind: its folder, a line in the experiment ledger, its figures.

What other stages use:
    run_folders.new_run_dir, run_folders.finish_run   runs/<time>-<kind>/ with checkpoint, history, curves
    ledger.append_run, ledger.read_runs               runs/ledger.jsonl
    figures.*_figure, figures.save                     matplotlib figures (curves, confusion, gallery, grids)
"""
