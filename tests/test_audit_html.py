"""audit's HTML report: self-contained, every finding named."""
import numpy as np
from PIL import Image

from pipeline.reports.audit_html import render


def test_a_duplicate_group_larger_than_its_thumbnails_names_the_others(tmp_path):
    """Past 6 thumbnails a group's other photos used to be left off the page without a word."""
    paths = [f"c/{i}.png" for i in range(9)]
    (tmp_path / "c").mkdir()
    for p in paths:
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / p)
    result = {"data_root": str(tmp_path), "rows": 9, "classes": ["c"], "folds": 2, "head": "h", "oof_acc": 1.0,
              "threshold": 0.88, "label_issues": [], "outliers": [], "test_cache": None, "leaks": [],
              "duplicates": [{"exact": False, "similarity": 0.99, "paths": paths, "classes": ["c"] * 9}]}
    page = render(result, top=40)
    assert page.count("data:image/jpeg;base64,") == 6 and "and 3 more: c/6.png, c/7.png, c/8.png" in page
