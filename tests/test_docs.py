"""The documents a newcomer reads first: no merge-conflict markers anywhere, a README of one screen's
worth of set-up / run / test, and links that lead somewhere."""
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^(<<<<<<< |=======$|>>>>>>> )", re.M)
TEXT_SUFFIXES = {".md", ".py", ".cfg", ".toml", ".txt", ".html", ".ipynb", ".json", ".yml", ".yaml", ""}


def tracked_text_files():
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        paths = [ROOT / line for line in out.splitlines()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an unpacked sdist)
        paths = [p for p in ROOT.rglob("*") if ".venv" not in p.parts and ".git" not in p.parts]
    return [p for p in paths if p.is_file() and p.suffix in TEXT_SUFFIXES]


def test_no_tracked_text_file_holds_merge_conflict_markers():
    files = tracked_text_files()
    assert any(p.name == "README.md" for p in files)
    bad = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        bad += [f"{path.relative_to(ROOT)}:{text[:m.start()].count(chr(10)) + 1}" for m in MARKER.finditer(text)]
    assert not bad, f"merge-conflict markers at {bad}"


def test_marker_check_sees_a_marker():
    text = "a\n<<<<<<< HEAD\nb\n=======\nc\n>>>>>>> branch\n"
    assert len(MARKER.findall(text)) == 3


def test_readme_is_short_and_its_sections_link_into_docs():
    text = (ROOT / "README.md").read_text()
    assert len(text) < 10_000, "the README is a one-screen set-up / run / test plus short sections"
    for heading in ("## Set up, run, test", "## The three commands"):
        assert heading in text


def test_relative_links_in_readme_and_docs_resolve():
    broken = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_the_option_tables_of_commands_md_are_the_ones_the_specs_write():
    """docs/commands.md's option tables come from pipeline/config.py's specs: after changing an option, run
    ``python bench/commands_doc.py``."""
    from pipeline.cli import with_option_tables

    text = (ROOT / "docs" / "commands.md").read_text(encoding="utf-8")
    assert text.count("<!-- options: ") >= 20
    assert with_option_tables(text) == text, "docs/commands.md is out of date: run python bench/commands_doc.py"


def github_anchor(heading):
    """The id GitHub gives a heading: lower case, punctuation dropped but '-' and '_', spaces to '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors_of(doc):
    text = doc.read_text(encoding="utf-8")
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)  # a '# comment' in a code block is no heading
    ids = {github_anchor(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*$", text, re.M)}
    return ids | set(re.findall(r'<a (?:id|name)="([^"]+)"', text))


def test_github_anchor_follows_githubs_rule():
    assert github_anchor("A second view of each photo (flip)") == "a-second-view-of-each-photo-flip"
    assert github_anchor("Fused or one backbone alone, by CV") == "fused-or-one-backbone-alone-by-cv"


def test_links_to_a_section_name_one_that_exists():
    """A link's '#section' leads somewhere only if the page has that heading (a bold paragraph has no id)."""
    broken = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", doc.read_text(encoding="utf-8")):
            page = doc.parent / target if target else doc
            if "://" in target or page.suffix != ".md" or not page.exists():
                continue
            if anchor not in anchors_of(page):
                broken.append(f"{doc.relative_to(ROOT)} -> {target}#{anchor}")
    assert not broken, broken


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def command_line_slips(text):
    """Every `python cli.py CMD --opt ...` (a line continued with '\\' included) and every inline `CMD --opt ...`
    of ``text`` whose command or option the CLI does not have: ["line N: ..."]."""
    from pipeline.cli import cli

    top = {o for p in cli.params for o in (*p.opts, *p.secondary_opts)}

    def options(cmd):
        return top | {"--help", "-h"} | {o for p in cli.commands[cmd].params for o in (*p.opts, *p.secondary_opts)}

    text = re.sub(r"\\\n\s*", " ", text)
    slips = []
    for m in re.finditer(r"(?:python3? |torchrun [^`\n]*?)cli\.py((?: [^`\n|#]*)?)|`([a-z][a-z-]+)( --?[a-zA-Z][^`]*)`",
                         text):
        words = (m.group(1) or "").split() if m.group(2) is None else [m.group(2), *m.group(3).split()]
        words = [w for w in words if not (w in top and words.index(w) == 0)]
        while words and words[0] in top:
            words = words[1:]
        if not words or not re.fullmatch(r"[a-z][a-z-]+", words[0]):
            continue
        line = text[:m.start()].count("\n") + 1
        if words[0] not in cli.commands:
            if m.group(2) is None:  # `word --x` in prose may be another tool's; after cli.py it is ours
                slips.append(f"line {line}: no command {words[0]!r}")
            continue
        for w in words[1:]:
            opt = re.match(r"--?[a-zA-Z][\w-]*", w)
            if opt and opt.group(0) not in options(words[0]):
                slips.append(f"line {line}: {words[0]} has no {opt.group(0)}")
    return slips


def test_command_line_slips_sees_a_wrong_command_and_option():
    text = "`python cli.py fit-head --cache A \\\n    --no-such 1` and `extract --dat X` and `python cli.py fitt`"
    assert command_line_slips(text) == ["line 1: fit-head has no --no-such", "line 1: extract has no --dat",
                                        "line 1: no command 'fitt'"]
    assert command_line_slips("`python cli.py -q choose-backbone --data D --backbone b=w` `predict --explain D`") == []


def test_every_command_and_option_the_docs_name_exists():
    """A renamed option or command leaves no `python cli.py X --old` behind in a doc a newcomer copies from."""
    slips = [f"{doc.relative_to(ROOT)} {slip}" for doc in DOCS
             for slip in command_line_slips(doc.read_text(encoding="utf-8"))]
    assert not slips, slips


def test_layout_md_names_every_module_and_no_missing_one():
    text = (ROOT / "docs" / "layout.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`(?:pipeline/)?([a-z_]+\.(?:py|html))`", text))
    files = {p.name for p in (ROOT / "pipeline").rglob("*") if p.suffix in (".py", ".html")}
    unsaid = files - named - {"__init__.py"}
    assert not unsaid, f"docs/layout.md does not say what these are: {sorted(unsaid)}"
    missing = {n for n in named - files if not (ROOT / n).exists()}
    assert not missing, f"docs/layout.md names modules that are not there: {sorted(missing)}"


def test_every_pipeline_name_the_docs_write_is_there():
    """`pipeline.X.Y` in a doc (a function, class, module or constant) imports or is an attribute."""
    import importlib

    bad = set()
    for doc in DOCS:
        for name in re.findall(r"`[^`\n]*?\b(pipeline(?:\.[A-Za-z_]\w*)+)", doc.read_text(encoding="utf-8")):
            parts = name.split(".")
            for i in range(len(parts), 0, -1):
                try:
                    obj = importlib.import_module(".".join(parts[:i]))
                    break
                except ImportError:
                    continue
            for attr in parts[i:]:
                obj = getattr(obj, attr, None)
            if obj is None:
                bad.add(f"{doc.relative_to(ROOT)}: {name}")
    assert not bad, sorted(bad)


def test_every_bench_and_example_script_the_docs_run_is_there_with_its_options():
    """`python bench/X.py --opt` in a doc: the script exists and its source declares the option."""
    bad = []
    for doc in DOCS:
        text = re.sub(r"\\\n\s*", " ", doc.read_text(encoding="utf-8"))
        for folder, name, args in re.findall(r"python ((?:bench|examples))/(\w+\.py)([^`\n|#]*)", text):
            script = ROOT / folder / name
            if not script.is_file():
                bad.append(f"{doc.relative_to(ROOT)}: no {folder}/{name}")
                continue
            source = script.read_text(encoding="utf-8")
            bad += [f"{doc.relative_to(ROOT)}: {folder}/{name} has no {o}"
                    for o in re.findall(r"(?:^|\s)(--[a-z][a-z0-9-]*)", args) if f'"{o}"' not in source]
    assert not bad, bad
