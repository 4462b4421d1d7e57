"""Every command's result as the text a person reads on the terminal, in one place.

The CLI parses options, calls one API function and hands its result here; the stages return results and
write files (predict's csv/json/table rows stay in ``models/predict.py``: they are its output files too).
Nothing here computes or writes anything, and nothing here imports torch. A loss is printed ``+ 0.0``: one of 0
computed as -mean(log 1) is -0.0, which read '-0.0000'.
"""
from __future__ import annotations

import math
import shlex
from typing import TYPE_CHECKING, Optional

from ..data.check_images import KINDS
from ..files import one_line
from ..heads.trust_text import kept_text
from ..runs.ledger import ledger_path

if TYPE_CHECKING:
    from ..cache.feature_cache import ConsolidateResult
    from ..data.apply_fixes import FixesResult
    from ..data.check_images import CheckImagesResult
    from ..data.fetch import FetchResult
    from ..extraction.extract import ExtractResult
    from ..heads.backbone_choice import BackboneChoice
    from ..heads.compare import CompareResult
    from ..heads.fit_head import FitHeadResult
    from ..models.predict import ImagenetCheckResult, PredictResult
    from ..models.summary import SummaryResult
    from ..models.train import TrainResult
    from ..serving.export import ExportResult
    from .audit import AuditResult
    from .demo import DemoResult
    from .evaluate import EvaluateResult
    from .pictures import FeatureMapResult
    from .suggest import SuggestResult


def plural(k: int, word: str) -> str:
    return f"{k} {word}" if k == 1 else f"{k} {word}s"


def trust_lines(trust: dict) -> list[str]:
    """The temperature and the unknown threshold as a person reads them (fit-head, train, finetune)."""
    lines = [f"temperature {trust['temperature']:.3f} (fitted on {trust['calibration_rows']} rows: "
             f"{trust['calibrated_on']})" if trust.get("calibration_rows") else "temperature 1 (not calibrated)"]
    if "unknown_threshold" in trust:
        lines.append(f"unknown above score {trust['unknown_threshold']:.4f} ({kept_text(trust)}; "
                     f"{plural(trust['known_rows'], 'training row')} kept, {trust['known_rows_bytes'] / 1e6:.1f} MB)")
    return lines


def fit_head_text(r: FitHeadResult) -> str:
    """fit-head's result as the lines a person reads (the epoch lines went to stderr as they came)."""
    per_class = ", ".join(f"{c} {a:.3f}" for c, a in r.per_class_val_acc.items() if a is not None)
    best = f", best epoch {r.best_epoch} of {len(r.history)}" if r.history else ""
    tuned = f" (tuned: {r.tuning['choice']})" if r.tuning else ""
    lines = [f"{r.head}{tuned}",
             f"val acc {r.val_acc:.3f}, val loss {r.val_loss + 0.0:.4f} ({r.train_rows} train / {r.val_rows} "
             f"val rows, {r.fit_seconds:.1f} s{best})",
             f"per-class val acc: {per_class}"]
    if r.tuning:
        t = r.tuning
        lines.append(f"{t['folds']}-fold CV on the training rows: acc {t['cv_acc']:.3f} ± {t['cv_acc_std']:.3f}, "
                     f"log-loss {t['cv_log_loss'] + 0.0:.4f}")
    if r.tuning and r.tuning.get("fusion"):
        tried = r.tuning["fusion"]
        lines.append("fused features or one cache alone, by CV acc / log-loss: "
                     + ", ".join(f"{t['rows']} {t['cv_acc']:.3f} / {t['cv_log_loss'] + 0.0:.4f}" for t in tried)
                     + f"; kept {next(t['rows'] for t in tried if t['chosen'])}")
    lines += trust_lines(r.trust)
    if r.test:
        t = r.test
        # a class without test photos (a test set of some of the head's classes): '-', as evaluate says it
        per = ", ".join(f"{c} {a:.3f}" if a is not None else f"{c} -" for c, a in t["per_class"].items())
        cal = t["calibration"]
        lines += [f"test acc {t['acc']:.3f}, test loss {t['loss'] + 0.0:.4f} ({t['rows']} images of {t['cache']})",
                  f"per-class test acc: {per}",
                  f"test ECE {cal['after']['ece']:.4f} calibrated, {cal['before']['ece']:.4f} without the temperature"
                  if r.trust.get("calibration_rows") else  # --calibrate none: one figure, of a head not calibrated
                  f"test ECE {cal['before']['ece']:.4f} (not calibrated: T = 1)"]
        if "known_kept" in t:
            lines.append(f"test photos kept as known: {t['known_kept']:.1%} (--known-share "
                         f"{r.trust['known_share']:.0%}; the rest score above the unknown threshold)")
        if t["overlap"]:
            lines.append(f"warning: {len(t['overlap'])} test images are copies of training images")
    lines.append(f"checkpoint: {r.checkpoint}")
    return "\n".join(lines)


def compare_text(result: CompareResult) -> str:
    models = result.models
    test = any("test_acc" in m for m in models)
    rows = [("model", "val acc", "val log-loss", *(("test acc", "test log-loss") if test else ()), "fit time")]
    for m in models:
        loss = lambda v: "-" if v is None else f"{v + 0.0:.4f}"  # noqa: E731 (an SVC gives no probabilities)
        t = (f"{m['test_acc']:.3f}", loss(m["test_loss"])) if "test_acc" in m else (("-", "-") if test else ())
        rows.append((m["model"], f"{m['val_acc']:.3f}", loss(m["val_loss"]), *t, f"{m['fit_seconds']:.1f} s"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for m in models:
        accs = ", ".join(f"{c} {a:.3f}" for c, a in m["per_class_val_acc"].items() if a is not None)
        lines.append(f"per-class val acc, {m['model'].split(',')[0].rstrip(')')}): {accs}")  # name (view)
    s = result.split
    lines.append(f"(same split: {s['train_rows']} train / {s['val_rows']} val rows, seed {s['seed']}; "
                 f"cache {result.cache}{'; test ' + result.test_cache if result.test_cache else ''})")
    return "\n".join(lines)


def choose_backbone_text(choice: BackboneChoice) -> str:
    """The table a person reads, best first, and the recommendation."""
    from ..heads.backbone_choice import plus_minus

    w = max(len("candidate"), *(len(c.name) for c in choice.candidates))
    alike = any(math.isnan(x) for c in choice.candidates for x in (c.acc_se, c.log_loss_se, c.diff_se))
    lines = [f"{choice.repeats} x {choice.folds}-fold stratified CV of fit-head's default head on {choice.rows} "
             f"photos of {choice.classes} classes ({choice.data}); ± one standard error (corrected for overlapping "
             "folds" + ("; n/a where every fold scored the same: no spread to estimate it from)" if alike else ")"),
             f"  {'candidate':<{w}}  {'features':>8}  {'CV accuracy':>15}  {'log-loss':>15}  {'vs best':>13}  "
             f"{'img/s':>7}  {'MB/1k':>6}",
             ]
    for c in choice.candidates:
        mark = "*" if c.name == choice.fastest_within_noise else " "
        vs = "best" if c.name == choice.best else f"{-100 * c.diff + 0.0:+.1f} ± {plus_minus(100 * c.diff_se, '.1f')}"
        noise = "" if c.name == choice.best else ("  (within noise)" if c.within_noise else "")
        rate = f"{c.img_per_s:7.1f}" if c.img_per_s else f"{'n/a':>7}"
        acc, loss = plus_minus(100 * c.acc_se, "4.1f"), plus_minus(c.log_loss_se, "5.3f")
        lines.append(f"{mark} {c.name:<{w}}  {c.features:>8}  {100 * c.acc:6.1f} ± {acc} %  "
                     f"{c.log_loss + 0.0:6.3f} ± {loss}  {vs:>13}  {rate}  {c.mb_per_1000:6.1f}{noise}")
    lines.append(f"(* recommended; extraction {choice.extract_seconds:.0f} s, "
                 f"cross-validation {choice.cv_seconds:.0f} s; img/s as extract ran on this machine, "
                 "n/a for a cache made before rates were kept)")
    lines.append(choice.note)
    return "\n".join(lines)


def summary_text(result: SummaryResult) -> str:
    lines = [f"{'layer':<28} {'type':<22} {'output shape':<16} {'params':>12} {'trainable':>12} {'block':>5}"]
    for r in result.layers:
        shape = "x".join(map(str, r["output_shape"] or []))
        block = "" if r["block"] is None else str(r["block"])
        lines.append(f"{r['layer']:<28} {r['type']:<22} {shape:<16} {r['params']:>12,} {r['trainable']:>12,} "
                     f"{block:>5}")
    lines += [
        f"{result.backbone} + head for {result.classes} classes (pool {result.pool}, input "
        f"{'x'.join(map(str, result.input_shape))}, unfreeze {result.unfreeze}, "
        f"{result.blocks} backbone blocks)",
        f"Total params:         {result.total_params:>12,}",
        f"Trainable params:     {result.trainable_params:>12,}",
        f"Non-trainable params: {result.frozen_params:>12,}",
    ]
    return "\n".join(lines)


def check_images_text(result: CheckImagesResult, max_listed: int = 50) -> str:
    """The stdout table: counts per kind with an example, then the files with errors."""
    lines = [f"checked {result.files} files in {result.root} ({result.seconds:.1f} s, "
             f"{plural(result.workers, 'worker') if result.workers > 1 else 'in this process'}): "
             f"{result.errors} with errors, {result.notes} with notes only"
             + (f"; {plural(len(result.unreadable_folders), 'folder')} the OS will not list, its files unseen"
                if result.unreadable_folders else "")]
    if result.by_kind:
        example = {}
        for f in result.findings:
            example.setdefault(f["kind"], one_line(f["path"]))  # a name with a newline or ESC: one line, escaped
        lines.append(f"{'kind':<20} {'severity':<8} {'count':>6}  example")
        for kind, n in result.by_kind.items():
            lines.append(f"{kind:<20} {KINDS[kind]:<8} {n:>6}  {example[kind]}")
    errors = [f for f in result.findings if f["severity"] == "error"]
    if errors:
        lines.append("files extract cannot use:")
        lines += [f"  {one_line(f['path'])}: {one_line(f['detail'])}" for f in errors[:max_listed]]
        if len(errors) > max_listed:
            lines.append(f"  ... and {len(errors) - max_listed} more (write them all with --report)")
    if result.empty_classes:
        lines.append(f"class folders without a usable image (extract refuses {result.root} while they are there: add "
                     f"photos or move them out): {', '.join(one_line(c) for c in result.empty_classes)}")
    if result.report:
        lines.append(f"report: {result.report}")
    q = result.quarantine
    if q:
        back = f"; to move them back:\n  {q['restore']}" if q["restore"] else ""
        lines.append(f"moved {plural(q['moved'], 'file')} to {q['dir']}{back}")
        if q["left_linked"]:
            lines.append(f"left {plural(len(q['left_linked']), 'file')} in place: they are in linked folders, whose "
                         f"files lie outside {result.root} (first: {one_line(q['left_linked'][0])})")
    return "\n".join(lines)


def demo_next_text(nxt: dict) -> str:
    lines = [f"feature cache:   {nxt['cache']}", f"head checkpoint: {nxt['checkpoint']}",
             *([f"training curves: {nxt['curves']} (the linear head's, compared above: the checkpoint's default "
                "head fits without epochs)"] if nxt["curves"] else []), "next, try:"]
    return "\n".join(lines + [f"  {c}" for c in nxt["commands"]])


def suggest_text(r: SuggestResult, top: int = 20) -> str:
    """The list as the lines a person reads on stdout."""
    if not r.rows:  # was '0 of 15 pool photos to label next' above an empty table
        return "\n".join([f"nothing to suggest: all {r.pool} pool photos are already labelled (the same bytes are in "
                          "the labelled folder)", f"list: {r.csv}", f"page: {r.html}"])
    names = [one_line(x["path"]) for x in r.rows[:top]]  # a name's newline must not start a row of its own
    w = max([len("photo")] + [len(n) for n in names])
    g = max([14] + [len(one_line(x["predicted"])) + 1 for x in r.rows[:top]])  # a class 'breakfast_burrito' too
    lines = [f"{len(r.rows)} of {r.pool - r.skipped} pool photos to label next (rule {r.rule}; head {r.head} on "
             f"{r.labelled} labelled photos" + (f"; {plural(r.skipped, 'pool photo')} already labelled left out"
                                                 if r.skipped else "") + ")",
             f"{'rank':>4}  {'photo':<{w}}  {'guess':<{g}} {'uncertainty':>11} {'distance':>8}  unknown"]
    lines += [f"{x['rank']:>4}  {n:<{w}}  {one_line(x['predicted']):<{g}} {x['uncertainty']:>11.3f} "
              f"{x['distance']:>8.3f}  {'true' if x['unknown'] else 'false':>7}" for x, n in zip(r.rows, names)]
    if len(r.rows) > top:
        lines.append(f"... and {len(r.rows) - top} more ({r.csv})")
    lines += [f"list: {r.csv}", f"page: {r.html}"]
    return "\n".join(lines)


def _unknown_line(result: EvaluateResult) -> list[str]:
    u = result.unknown
    if not u:
        return []
    return [f"unknown: {u['flagged']} of {result.rows} photos ({u['share']:.1%}) score above {u['threshold']:.4f}"]


def evaluate_text(result: EvaluateResult) -> str:
    if result.foreign:
        called = ", ".join(f"{c} {n}" for c, n in result.called.items())
        return "\n".join(_unknown_line(result) + [
            f"{result.rows} photos of none of the model's classes ({result.source}); best class: {called} "
            f"(median top probability {result.median_top_probability:.2f})"])
    cal = result.calibration
    lines = [f"accuracy {result.accuracy:.3f}, loss {result.loss + 0.0:.4f}, macro F1 {result.macro_f1:.3f} "
             f"on {result.rows} images ({result.source})"]
    width = max(5, *(len(c) for c in result.per_class))
    lines.append(f"{'class':<{width}}  precision  recall     f1  support")
    for c, m in result.per_class.items():
        p, r, f = (f"{m[k]:.3f}" if m[k] is not None else "-" for k in ("precision", "recall", "f1"))
        lines.append(f"{c:<{width}}  {p:>9}  {r:>6}  {f:>5}  {m['support']:>7d}")
    b, a = cal["before"], cal["after"]
    lines += [f"calibration (T = {cal['temperature']:.3f}): ECE {b['ece']:.4f} -> {a['ece']:.4f}, log-loss "
              f"{b['log_loss'] + 0.0:.4f} -> {a['log_loss'] + 0.0:.4f}, Brier {b['brier']:.4f} -> {a['brier']:.4f}",
              *_unknown_line(result),
              f"reliability diagram: {result.reliability_png}",
              f"confusion matrix: {result.confusion_png}"]
    if result.gallery_png:  # none written where no image is misclassified
        lines.append(f"most confidently wrong ({len(result.wrong)} of {result.errors}): {result.gallery_png}")
    return "\n".join(lines)


def audit_text(r: AuditResult | FixesResult, top: int = 20, cache_dir: str = "features", runs_dir: str = "runs") -> str:
    """The audit (or its --apply, --undo) as the lines a person reads on stdout; ``cache_dir`` and ``runs_dir``:
    the audit's, which the --apply command it prints passes on where they are not the defaults."""
    from ..data.apply_fixes import FixesResult

    if isinstance(r, FixesResult):
        return audit_fixes_text(r)
    lines = [f"audited {r.rows} photos of {r.data_root} ({len(r.classes)} classes; cache {r.cache})",
             f"out-of-fold probabilities: {r.folds} refits of {r.head} (out-of-fold acc {r.oof_acc:.3f})",
             f"label issues: {len(r.label_issues)}   outliers: {len(r.outliers)}   "
             f"duplicate groups: {len(r.duplicates)}   leaks: "
             f"{len(r.leaks) if r.test_cache else '- (no --test-data)'}   unreadable: {len(r.unreadable)}"]
    if r.label_issues:  # names and classes one_line'd: a newline in one must not start a row of its own
        w = max(len("likely wrong label"), *(len(one_line(i["path"])) for i in r.label_issues[:top]))
        c = max(12, *(len(one_line(i[k])) for i in r.label_issues[:top] for k in ("given", "suggested")))  # burrito
        lines += ["", f"{'likely wrong label':<{w}}  {'given':<{c}} {'suggested':<{c}} score",
                  f"{'-' * w}  {'-' * c} {'-' * c} -----"]
        lines += [f"{one_line(i['path']):<{w}}  {one_line(i['given']):<{c}} {one_line(i['suggested']):<{c}} "
                  f"{i['score']:.3f}" for i in r.label_issues[:top]]
        if len(r.label_issues) > top:
            lines.append(f"... and {len(r.label_issues) - top} more (report.json)")
    if r.outliers:
        lines += ["", "like no other photo (outlier score = 1 - mean cosine similarity to its 10 nearest):"]
        lines += [f"  {one_line(o['path'])}  ({one_line(o['given'])}, {o['score']:.3f})" for o in r.outliers[:top]]
        lines += _more(r.outliers, top)
    if r.duplicates:
        lines += ["", f"duplicates (cosine >= {r.threshold} and the same layout, or the same bytes):"]
        for g in r.duplicates[:top]:
            kind = "exact" if g["exact"] else f"{g['similarity']:.3f}"
            more = len(g["paths"]) - GROUP_LISTED  # a group of thousands was one line of hundreds of KB
            lines.append(f"  {kind:>6}  " + "  ".join(f"{one_line(p)} ({one_line(c)})" for p, c in
                                                      zip(g["paths"][:GROUP_LISTED], g["classes"][:GROUP_LISTED]))
                         + (f"  ... and {more} more (report.json)" if more > 0 else ""))
        lines += _more(r.duplicates, top, "groups ")
    if r.leaks:
        lines += ["", f"leaks: test photos with a copy in the training folder ({r.test_root}):"]
        lines += [f"  {'exact' if lk['exact'] else format(lk['similarity'], '.3f'):>6}  test {one_line(lk['test'])}  = "
                  f"train {one_line(lk['train'])}" for lk in r.leaks[:top]]
        lines += _more(r.leaks, top)
    if r.unreadable:
        lines += ["", "unreadable files (not audited; check-images --quarantine moves them out of the folder):"]
        lines += [f"  {one_line(u['path'])}: {one_line(u['reason'])}" for u in r.unreadable[:top]]
        lines += _more(r.unreadable, top)
    lines += ["", f"report: {r.html}", *([f"gallery: {r.gallery}"] if r.gallery else []),  # none: no label issue
              f"to fix: review {r.fixes} (action relabel / remove / keep), then "
              f"{apply_command(r, cache_dir, runs_dir)}"]
    return "\n".join(lines)


def apply_command(r: AuditResult, cache_dir: str, runs_dir: str) -> str:
    """The command that applies the reviewed list, as a shell takes it: its paths quoted (a folder 'my pets' was
    printed bare, two words to the shell), and the audit's --cache-dir and --runs-dir where not the defaults (its
    refresh looked for the folder's cache in features/ and found none: the next fit-head trained on the old
    labels' cache; its run folder went to runs/)."""
    words = ["python cli.py audit", "--data", r.data_root, "--apply", r.fixes]
    for option, value, default in (("--cache-dir", cache_dir, "features"), ("--runs-dir", runs_dir, "runs")):
        if value and str(value) != default:
            words += [option, str(value)]
    return " ".join([words[0], *(w if w.startswith("--") else shlex.quote(w) for w in words[1:])])


#: Photos of one duplicate group listed on stdout (report.json and the HTML page name them all).
GROUP_LISTED = 6


def _more(items: list, top: int, what: str = "") -> list[str]:
    """The line saying how many of ``items`` the table left out (none when it showed them all)."""
    return [f"  ... and {len(items) - top} more {what}(report.json)"] if len(items) > top else []


def audit_fixes_text(r: FixesResult) -> str:
    lines = [f"{r.what} {r.moved} files in {r.root} (journal {r.journal})"]
    ref = r.refreshed
    if ref:
        lines.append(f"cache {ref['cache']}: " + ("a hit, nothing computed" if ref["hit"] else
                     f"{ref['reused']} rows reused by content ({ref['label_changes']} now in another class), "
                     f"{ref['computed']} computed"))
    if r.undo:
        lines.append(f"to undo: {r.undo}")
    return "\n".join(lines)


def _metric(v) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def runs_table(records: list[dict], sort_by: Optional[str] = None) -> str:
    """A table: time, kind, backbone, cache, scalar metrics (``sort_by`` first), first output. A run made as part
    of another command (compare-sklearn's heads) is of kind 'fit-head (compare-sklearn)': they read as fit-head's.
    A line without the time or kind every run records (one written by hand or another tool: the ledger takes it)
    shows '?' there, not a blank row; its metrics and output still show."""
    rows = [("time", "kind", "backbone", "cache", "metrics", "output")]
    for r in records:
        m = {k: v for k, v in r.get("metrics", {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        keys = ([sort_by] if sort_by in m else []) + [k for k in m if k != sort_by]
        outputs = r.get("outputs") or [""]
        kind = (r.get("kind") or "?") + (f" ({r['part_of']})" if r.get("part_of") else "")
        rows.append(((r.get("time") or "?")[:19].replace("T", " "), kind, r.get("backbone", ""),
                     r.get("cache_fingerprint", "")[:12], " ".join(f"{k}={_metric(m[k])}" for k in keys),
                     str(outputs[0])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def runs_text(records: list[dict], sort_by: Optional[str], runs_dir, cache: Optional[str] = None,
              backbone: Optional[str] = None) -> str:
    """The runs command: the ledger's table, or where no run was recorded (or none matched the filters)."""
    if records:
        return runs_table(records, sort_by)
    filters = " and ".join(f"--{k} {v}" for k, v in (("cache", cache), ("backbone", backbone)) if v)
    return f"no runs in {ledger_path(runs_dir)}" + (f" match {filters}" if filters else "")


def extract_notes(result: ExtractResult) -> list[str]:
    """extract's informational lines (stderr): a hit, or what was computed, reused and skipped."""
    if result.hit:
        return [f"cache hit: {result.rows} rows already extracted, nothing computed"
                f"{' (every photo checked against its sha256)' if result.verified else ''}"]
    one_off = [f"{what} {getattr(result, k):.0f} s" for k, what in (
        ("calibration_seconds", "int8 calibration" + (" reused" if result.calibration_reused else "")),
        ("compile_seconds", "compiling" + (f" (compile cache {result.compile_cache})"
                                           if result.compile_cache else ""))) if getattr(result, k)]
    lines = [f"extracted {plural(result.computed, 'image')} ({result.img_per_s:.1f} img/s"
             f"{', not counting ' + ' and '.join(one_off) if one_off else ''}), "
             f"{result.skipped} skipped, {result.rows} rows in "
             f"{'shards of rank ' + str(result.rank) if result.rank is not None else 'cache'}"]
    if result.reused:
        lines.append(f"reused {result.reused} rows of earlier caches by content ({result.label_changes} of "
                     f"them now in another class), computed {result.computed}")
    return lines


def extract_interrupted(command: str, stopped: BaseException) -> str:
    """Ctrl-C (a KeyboardInterrupt: ``ExtractionInterrupted`` once the cache is open) or SIGTERM / SIGHUP (a
    ``files.Terminated``: ``ExtractionTerminated``) during extract: one line, what is kept and the command that
    goes on, so a scheduler's log keeps it whole; without a count (stopped before the cache was opened) the
    committed rows in general. Ctrl-C's starts on a line of its own, after the terminal's ^C."""
    word = "\ninterrupted" if isinstance(stopped, KeyboardInterrupt) else "terminated"
    rows = getattr(stopped, "rows", None)
    kept = ("committed rows are kept" if rows is None
            else f"{plural(rows, 'row')} kept in {one_line(str(stopped.cache))}")
    return f"{word}; {kept}. Resume with: {command}"


def train_interrupted(stopped, command: str) -> str:
    """Ctrl-C (``models.resume.TrainingInterrupted``) or SIGTERM / SIGHUP (``TrainingTerminated``) during train /
    finetune: one line, what is kept and the command that resumes it, the same for both (SIGTERM's named the
    Python API's ``resume=``). Ctrl-C's starts on a line of its own, after the terminal's ^C."""
    word = "\ninterrupted" if isinstance(stopped, KeyboardInterrupt) else "terminated"
    if stopped.run_dir is None:
        return f"{word} during the first epoch: nothing was saved"
    again = command if "--resume" in command else f"{command} --resume {shlex.quote(str(stopped.run_dir))}"
    return (f"{word}; {plural(stopped.epochs_done, 'epoch')} of {stopped.epochs} kept in "
            f"{stopped.run_dir}/model.pt. Resume with: {again}")


def consolidate_note(result: ConsolidateResult) -> str:
    return (f"{result.rows} rows copied into one file ({result.size_bytes / 1e6:.1f} MB); "
            f"its {len(result.shards)} shard files are no longer needed")


def caches_text(result: dict, cache_dir) -> str:
    """The caches command's table: one line per cache, then the files that are not usable caches. Columns as
    wide as their widest entry (a 48-wide path column pushed every later column of a Lite0 cache out of line)."""
    rows = [(one_line(c["path"]), one_line(c["backbone"]), str(c["rows"]), _classes_cell(c["classes"]),
             f"{c['size_bytes'] / 1e6:.1f}MB", c["created"] + ("" if c["complete"] else "  (incomplete)")
             + ("  (sharded)" if c.get("sharded") else "")) for c in result["caches"]]
    head = ("path", "backbone", "rows", "classes", "size", "created")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head) - 1)]
    right = (False, False, True, False, True)
    lines = ["  ".join(v.rjust(w) if r else v.ljust(w) for v, w, r in zip(row[:-1], widths, right)) + "  " + row[-1]
             for row in [head, *rows]]
    lines += [f"not a usable cache: {b['path']}: {b['why']}" for b in result["unreadable"]]
    return "\n".join(lines) if result["caches"] or result["unreadable"] else f"no caches in {cache_dir}"


def _classes_cell(classes: list, width: int = 40) -> str:
    """'6: buildings,forest,...' cut whole names short at ``width`` (the column was cut mid-word at 20)."""
    text = f"{len(classes)}: " + ",".join(one_line(c) for c in classes)
    if len(text) <= width:
        return text
    cut = text.rfind(",", 0, width - 3)
    return text[:cut] + ",..." if cut > 0 else text[:width - 3] + "..."


def feature_map_note(result: FeatureMapResult) -> str:
    return f"feature map {' x '.join(map(str, result.feature_shape))}, top channels {result.top_channels}"


def fetch_note(result: FetchResult) -> str:
    state = "downloaded" if result.downloaded else "already complete"
    return (f"{result.archive}: {result.bytes / 1e6:.1f} MB, {state}; "
            f"{'unpacked' if result.unpacked_now else 'already unpacked'} to {result.unpacked}")


def demo_text(result: DemoResult) -> str:
    return compare_text(result.compare) + "\n\n" + demo_next_text(result.next)


def train_text(result: TrainResult) -> str:
    """train's and finetune's result as the lines a person reads."""
    m = result.metrics
    per_class = ", ".join(f"{c} {a:.3f}" if a is not None else f"{c} -" for c, a in m["per_class_val_acc"].items())
    return "\n".join([f"val acc {result.val_acc:.3f}, val loss {result.val_loss + 0.0:.4f} ({m['train_rows']} "
                      f"train / {m['val_rows']} val images, {m['skipped']} skipped, "
                      f"{result.fit_seconds:.1f} s)", f"per-class val acc: {per_class}", *trust_lines(m),
                      f"checkpoint: {result.checkpoint}"])


def predict_rows_text(rows: list[dict], fmt: str) -> str:
    """predict's rows on stdout: the same text as its --output file of that format."""
    from ..models.predict import format_rows

    return format_rows(rows, fmt)


def predict_note(result: PredictResult) -> str:
    heatmaps = f", heatmaps in {result.explain}" if result.explain else ""
    if result.images and result.errors == result.images:  # nothing classified: no speed to speak of
        return f"{plural(result.images, 'image')}, all unreadable"
    return (f"{plural(result.images, 'image')}, {result.errors} unreadable, "
            f"{result.img_per_s:.1f} img/s{heatmaps}")


def imagenet_check_text(result: ImagenetCheckResult) -> str:
    return "\n".join(f"{t['rank']}. {t['class']:<30} {t['probability']:.4f}" for t in result.top)


def export_text(result: ExportResult) -> str:
    """The parity check against predict, then what was written (or that nothing was)."""
    p = result.parity
    odd = len(p.get("odd_modes", ()))
    compared = f"{plural(p['images'], 'photo')}" + (f" and {plural(odd, 'odd-mode file')} made from the first" if odd
                                                     else "")
    return (f"max |probability difference| vs predict: {result.max_abs_diff:.3g} on {compared} "
            f"({p['same_class']} of {p['images'] + odd} the same class; tolerance {p['tolerance']:g})\n"
            + (f"{result.output} ({result.bytes / 1e6:.1f} MB), metadata {result.metadata}"
               if result.passed else "nothing written: the export does not predict as predict does"))
