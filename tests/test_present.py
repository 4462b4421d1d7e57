"""The terminal texts that used to be built inside cli.py, pinned byte for byte (the CLI prints them as they are)."""
from pipeline.files import Terminated
from pipeline.reports import present

TRUST = {"temperature": 0.886, "calibration_rows": 2, "calibrated_on": "val", "unknown_threshold": 0.91991,
         "known_kept": 0.95, "held_out_rows": 20, "known_share": 0.95, "known_rows": 18, "known_rows_bytes": 1152}


def test_extract_notes_say_what_was_computed_reused_or_a_hit():
    from dataclasses import replace

    from pipeline.extraction.extract import ExtractResult

    hit = ExtractResult(cache="c.h5", hit=True, rows=20, skipped=0, verified=True)
    assert present.extract_notes(hit) == [
        "cache hit: 20 rows already extracted, nothing computed (every photo checked against its sha256)"]
    ran = ExtractResult(cache="c.h5", hit=False, computed=3, img_per_s=12.34, skipped=1, rows=20, reused=17,
                        label_changes=2, calibration_seconds=4.2, calibration_reused=True, compile_seconds=0)
    assert present.extract_notes(ran) == [
        "extracted 3 images (12.3 img/s, not counting int8 calibration reused 4 s), 1 skipped, 20 rows in cache",
        "reused 17 rows of earlier caches by content (2 of them now in another class), computed 3"]
    assert present.extract_notes(replace(ran, reused=0, calibration_seconds=0, rank=1)) == [
        "extracted 3 images (12.3 img/s), 1 skipped, 20 rows in shards of rank 1"]


def test_caches_text_is_a_table_or_says_there_are_none():
    c = {"path": "features/a.h5", "backbone": "tiny", "rows": 8, "classes": ["blue", "red"], "size_bytes": 2e5,
         "created": "2026-12-05T01:23:27+0000", "complete": False}
    text = present.caches_text({"caches": [c], "unreadable": [{"path": "x.h5", "why": "not HDF5"}]}, "features")
    assert text.splitlines() == [
        "path           backbone  rows  classes       size  created",
        "features/a.h5  tiny         8  2: blue,red  0.2MB  2026-12-05T01:23:27+0000  (incomplete)",
        "not a usable cache: x.h5: not HDF5"]
    assert present.caches_text({"caches": [], "unreadable": []}, "features") == "no caches in features"


def test_train_text_and_its_trust_lines():
    from types import SimpleNamespace

    metrics = {"per_class_val_acc": {"blue": 1.0, "red": None}, "val_acc": 1.0, "val_loss": 0.5556, "train_rows": 18,
               "val_rows": 2, "skipped": 0, **TRUST}
    result = SimpleNamespace(metrics=metrics, val_acc=1.0, val_loss=0.5556, fit_seconds=1.25,
                             checkpoint="runs/x/model.pt")  # a TrainResult's fields
    assert present.train_text(result).splitlines() == [
        "val acc 1.000, val loss 0.5556 (18 train / 2 val images, 0 skipped, 1.2 s)",
        "per-class val acc: blue 1.000, red -",
        "temperature 0.886 (fitted on 2 rows: val)",
        "unknown above score 0.9199 (keeps 19 of 20 held-out photos (95%; asked 95%); 18 training rows kept, 0.0 MB)",
        "checkpoint: runs/x/model.pt"]
    # today's record names the rows it counted (the log line says the same); an older one gave the total alone
    assert present.trust_lines({**TRUST, "val_known_kept": 0.5})[1] == (
        "unknown above score 0.9199 (keeps 19 of 20 held-out photos (95%; asked 95%): 1 of 2 validation rows, "
        "18 of 18 training rows scored against the others; 18 training rows kept, 0.0 MB)")
    assert present.kept_text({**TRUST, "held_out_rows": 18, "val_known_kept": None}).endswith(
        "(95%; asked 95%): 17 of 18 training rows scored against the others")


def test_fit_head_text_does_not_call_a_head_it_did_not_calibrate_calibrated():
    """fit-head --calibrate none --test-data printed 'test ECE 0.0757 calibrated, 0.0757 without the temperature'."""
    from types import SimpleNamespace

    from pipeline.heads.trust import NOT_CALIBRATED

    test = {"acc": 0.75, "loss": 0.71, "rows": 280, "cache": "t.h5", "per_class": {"a": 0.75}, "overlap": [],
            "calibration": {"temperature": 1.0, "before": {"ece": 0.0757}, "after": {"ece": 0.0757}}}
    r = SimpleNamespace(per_class_val_acc={"a": 0.7}, history=[], tuning=None, head="ProbeHead(...)", val_acc=0.7,
                        val_loss=0.66, train_rows=740, val_rows=100, fit_seconds=1.0, test=test, checkpoint="h.pt",
                        trust=dict(NOT_CALIBRATED))
    lines = present.fit_head_text(r).splitlines()
    assert "test ECE 0.0757 (not calibrated: T = 1)" in lines and "temperature 1 (not calibrated)" in lines
    r.trust = {"temperature": 0.985, "calibration_rows": 840, "calibrated_on": "cv+val"}
    test["calibration"] = {"temperature": 0.985, "before": {"ece": 0.0757}, "after": {"ece": 0.0631}}
    assert "test ECE 0.0631 calibrated, 0.0757 without the temperature" in present.fit_head_text(r).splitlines()


def test_export_text_passed_and_refused():
    from types import SimpleNamespace

    def text(fields: dict) -> str:  # an ExportResult's fields
        return present.export_text(SimpleNamespace(**fields))

    r = {"parity": {"images": 1, "same_class": 1, "tolerance": 1e-4}, "max_abs_diff": 2.94e-08, "passed": True,
         "output": "m.onnx", "bytes": 1.5e6, "metadata": "m.onnx.json"}
    assert text(r) == ("max |probability difference| vs predict: 2.94e-08 on 1 photo (1 of 1 the same "
                                      "class; tolerance 0.0001)\nm.onnx (1.5 MB), metadata m.onnx.json")
    odd = {**r, "parity": {**r["parity"], "images": 16, "same_class": 22, "odd_modes": ["a.png"] * 6}}
    assert "on 16 photos and 6 odd-mode files made from the first (22 of 22 the same class" in text(odd)
    assert text({**r, "passed": False}).endswith(
        "\nnothing written: the export does not predict as predict does")


def test_the_one_line_notes():
    from types import SimpleNamespace

    assert present.predict_note(SimpleNamespace(images=1, errors=0, img_per_s=3.0, explain="runs/h")) == \
        "1 image, 0 unreadable, 3.0 img/s, heatmaps in runs/h"
    assert present.feature_map_note(SimpleNamespace(feature_shape=[8, 8, 8], top_channels=[5, 4])) == \
        "feature map 8 x 8 x 8, top channels [5, 4]"
    assert present.fetch_note(SimpleNamespace(archive="a.zip", bytes=2e6, downloaded=False, unpacked_now=True,
                                              unpacked="data")) == "a.zip: 2.0 MB, already complete; unpacked to data"
    assert present.consolidate_note(SimpleNamespace(rows=9, size_bytes=1e6, shards=["a", "b"])) == \
        "9 rows copied into one file (1.0 MB); its 2 shard files are no longer needed"
    assert present.extract_interrupted("python cli.py extract --data d", KeyboardInterrupt()) == \
        "\ninterrupted; committed rows are kept. Resume with: python cli.py extract --data d"  # before the cache
    assert present.extract_interrupted("python cli.py extract", Terminated(143)) == \
        "terminated; committed rows are kept. Resume with: python cli.py extract"  # before the cache was opened
    assert present.imagenet_check_text(SimpleNamespace(top=[{"rank": 1, "class": "tabby", "probability": 0.5}])) == \
        "1. tabby                          0.5000"


def test_suggest_and_audit_tables_keep_a_row_a_line_whatever_the_names_hold():
    """A photo or class name with a newline used to print as a row of its own (a fake rank, a fake issue)."""
    from types import SimpleNamespace

    from pipeline.reports.audit import AuditResult

    evil = "evil\n  99  fake.jpg"
    r = SimpleNamespace(rows=[{"rank": 1, "path": evil, "predicted": "c\x1b[2J", "uncertainty": 0.5, "distance": 0.25,
                              "unknown": False}], pool=1, rule="margin", head="logreg", labelled=4, skipped=0,
                        csv="s.csv", html="s.html")
    lines = present.suggest_text(r).splitlines()
    assert len(lines) == 5 and lines[2] == "   1  evil\\n  99  fake.jpg  c\\x1b[2J             0.500    0.250    false"
    issue = {"path": evil, "given": "a\nb", "suggested": "c", "score": 0.5}
    audit = AuditResult(rows=4, data_root="d", classes=["a\nb", "c"], cache="x.h5", folds=2, head="h", oof_acc=1.0,
                        label_issues=[issue], outliers=[{**issue}],
                        duplicates=[{"exact": True, "paths": [evil, "x"], "classes": ["a\nb", "c"]}], threshold=0.88,
                        leaks=[{"exact": True, "test": evil, "train": evil}], test_cache="t.h5", test_root="t",
                        test_rows=1, unconfirmed={}, seconds={}, html="r.html", gallery="g.png", output="o",
                        report="o/report.json", fixes="f.csv", unreadable=[{"path": evil, "reason": "cut\nshort"}])
    text = present.audit_text(audit)
    assert "\n  99" not in text and "a\nb" not in text and text.count("evil\\n  99  fake.jpg") == 6
    assert "cut\nshort" not in text


def test_audit_text_lists_a_few_photos_of_a_big_duplicate_group_and_counts_what_it_leaves_out():
    """A folder of near-identical shots made one group of 6,300 photos: one stdout line of 700 KB."""
    from pipeline.reports.audit import AuditResult

    group = {"exact": False, "similarity": 0.95, "paths": [f"a/{i}.jpg" for i in range(500)], "classes": ["a"] * 500}
    outliers = [{"path": f"a/o{i}.jpg", "given": "a", "score": 0.5} for i in range(25)]
    audit = AuditResult(rows=600, data_root="d", classes=["a"], cache="x.h5", folds=2, head="h", oof_acc=1.0,
                        label_issues=[], outliers=outliers, duplicates=[group] * 3, threshold=0.88, leaks=[],
                        test_cache=None, test_root=None, test_rows=None, unconfirmed={}, seconds={}, html="r.html",
                        gallery="g.png", output="o", report="o/report.json", fixes="f.csv", unreadable=[])
    lines = present.audit_text(audit, top=2).splitlines()
    dup = [line for line in lines if "a/0.jpg" in line]
    assert len(dup) == 2 and dup[0].count(".jpg") == present.GROUP_LISTED
    assert dup[0].endswith(f"a/5.jpg (a)  ... and {500 - present.GROUP_LISTED} more (report.json)")
    assert "  ... and 1 more groups (report.json)" in lines and "  ... and 23 more (report.json)" in lines
    assert max(map(len, lines)) < 200


def test_audit_and_suggest_tables_stay_aligned_with_long_class_names():
    """food10's 'breakfast_burrito' (17 characters) overflowed the 12-character given/suggested columns (and
    suggest's 14-character guess): the scores of its rows stood further right than the others'."""
    from types import SimpleNamespace

    from pipeline.reports.audit import AuditResult

    issues = [{"path": "a/1.jpg", "given": "breakfast_burrito", "suggested": "bibimbap", "score": 0.965},
              {"path": "b/2.jpg", "given": "baklava", "suggested": "beet_salad", "score": 0.5}]
    audit = AuditResult(rows=4, data_root="d", classes=["a"], cache="x.h5", folds=2, head="h", oof_acc=1.0,
                        label_issues=issues, outliers=[], duplicates=[], threshold=0.88, leaks=[], test_cache=None,
                        test_root=None, test_rows=None, unconfirmed={}, seconds={}, html="r.html", gallery="g.png",
                        output="o", report="o/report.json", fixes="f.csv", unreadable=[])
    lines = present.audit_text(audit).splitlines()
    table = lines[lines.index(next(x for x in lines if x.startswith("likely wrong label"))):][:4]
    assert len({len(x) for x in table}) == 1 and table[0].endswith("score"), table
    assert table[2].split() == ["a/1.jpg", "breakfast_burrito", "bibimbap", "0.965"]
    rows = [{"rank": i + 1, "path": f"p{i}.jpg", "predicted": c, "uncertainty": 0.5, "distance": 0.25,
             "unknown": i == 0} for i, c in enumerate(("breakfast_burrito", "sea"))]
    r = SimpleNamespace(rows=rows, pool=2, rule="margin", head="logreg", labelled=4, skipped=0, csv="s", html="h")
    lines = present.suggest_text(r).splitlines()[1:4]
    assert len({len(x) for x in lines}) == 1, lines


def test_suggest_says_there_is_nothing_to_suggest_when_every_pool_photo_is_labelled():
    from types import SimpleNamespace

    r = SimpleNamespace(rows=[], pool=15, rule="margin", head="logreg", labelled=4, skipped=15, csv="s.csv",
                        html="s.html")
    lines = present.suggest_text(r).splitlines()
    assert lines[0].startswith("nothing to suggest: all 15 pool photos are already labelled")
    assert lines[1:] == ["list: s.csv", "page: s.html"]


def test_a_loss_of_zero_is_never_printed_as_a_negative_zero():
    """compare-sklearn printed '-0.0000' where a scikit-learn model gave every validation photo probability 1 (its
    log-loss, -mean(log 1), is -0.0); fit-head's and evaluate's losses the same. Every loss now reads 0.0000."""
    import numpy as np

    from pipeline.heads.compare import CompareResult
    from pipeline.heads.model_selection import log_loss

    zero = log_loss(np.array([0, 1]), np.eye(2))
    assert zero == 0 and str(zero) == "-0.0"
    model = {"model": "sklearn LogisticRegression (flat, standardized, C=1)", "val_acc": 1.0, "val_loss": zero,
             "test_acc": 1.0, "test_loss": zero, "fit_seconds": 0.1, "per_class_val_acc": {"blue": 1.0}}
    text = present.compare_text(CompareResult(cache="c.h5", split={"train_rows": 8, "val_rows": 2, "seed": 0},
                                              models=[model], head_run_dir="runs/x", test_cache="t.h5",
                                              source_changed=None, default_cache=None))
    assert "0.0000" in text and "-0" not in text, text


def test_counts_of_one_are_singular_and_nothing_read_has_no_speed():
    """'extracted 1 images', '1 pool photos already labelled left out' beside '5 of 31 pool photos' (31 counting
    the one left out), and '3 images, 3 unreadable, 58.3 img/s' when nothing was classified."""
    from types import SimpleNamespace

    from pipeline.extraction.extract import ExtractResult

    one = ExtractResult(cache="c.h5", hit=False, computed=1, img_per_s=2.0, skipped=0, rows=1)
    assert present.extract_notes(one) == ["extracted 1 image (2.0 img/s), 0 skipped, 1 rows in cache"]
    r = SimpleNamespace(rows=[{"rank": 1, "path": "a.jpg", "predicted": "c", "uncertainty": 0.5, "distance": 0.25,
                               "unknown": False}], pool=31, rule="margin", head="logreg", labelled=4, skipped=1,
                        csv="s.csv", html="s.html")
    assert present.suggest_text(r).splitlines()[0] == ("1 of 30 pool photos to label next (rule margin; head logreg "
                                                       "on 4 labelled photos; 1 pool photo already labelled left out)")
    assert present.predict_note(SimpleNamespace(images=3, errors=3, img_per_s=58.3, explain=None)) == \
        "3 images, all unreadable"
