"""Images on disk: what a folder holds, how a file is decoded, and the commands that look after a folder.

What other stages use:
    folders.list_image_folder, folders.decode_image, folders.stratified_order   listing, safe decoding, sampling
    image_reader.ImageListDataset, image_reader.read_items, image_reader.batches  decoded batches for a network
    portable.preprocess     the decoding rule (Pillow + numpy only) that exports state and the example copies
    fetch.fetch_data        the fetch-data command (download, resume, unpack safely; its answer: FetchResult)
    check_images.check_images   the check-images command (decode everything, report, quarantine; its answer:
                                CheckImagesResult, exported here)
    apply_fixes.apply_fixes, apply_fixes.undo_fixes   audit --apply / --undo (journalled moves; FixesResult)
Nothing here imports torch at import time: a cache hit lists a folder without it.
"""

#: the stages' result dataclasses -> their modules, loaded on first use (as the other stages' packages do)
RESULTS = {"FetchResult": "fetch", "CheckImagesResult": "check_images", "FixesResult": "apply_fixes"}


def __getattr__(name: str):
    if name not in RESULTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{RESULTS[name]}"), name)
