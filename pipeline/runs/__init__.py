"""What each run leaves behind: its folder, a line in the experiment ledger, its figures.

What other stages use:
    run_folders.new_run_dir, run_folders.finish_run   runs/<time>-<kind>/ with checkpoint, history, curves
    run_folders.staged_run_dir, .publish_run_dir      the folder hidden until its checkpoint is written
    run_folders.staged_run, .moved_paths              the folder hidden until all its files are written
    ledger.append_run, ledger.read_runs               runs/ledger.jsonl
    figures.*_figure, figures.save                     matplotlib figures (curves, confusion, gallery, grids)
"""
