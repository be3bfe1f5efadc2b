#!/usr/bin/env python3
"""Writes the flag tables of docs/configuration.md from the binaries' own `--help`, so the
document cannot drift from the code: every flag, its environment variable, its default and
its help text. `--check` exits 1 (showing the difference) when the file is out of date.

    scripts/config-docs.py [--check] [--bin-dir target/debug]
"""
import argparse
import difflib
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "configuration.md"
# (marker, command line) for each generated table.
TABLES = [
    ("shared", None),
    ("worker", ["infermesh-worker"]),
    ("gateway", ["infermesh-gateway"]),
    ("up", ["infermesh", "up"]),
    ("infer", ["infermesh", "infer"]),
    ("models", ["infermesh", "models"]),
    ("health", ["infermesh", "health"]),
    ("bench", ["infermesh", "bench"]),
    ("load", ["infermesh", "load"]),
    ("unload", ["infermesh", "unload"]),
    ("routes", ["infermesh", "routes"]),
    ("auth hash-key", ["infermesh", "auth", "hash-key"]),
]
# A flag line; clap puts short help on the same line, long help on the lines below. An
# optional value shows as [<VALUE>].
FLAG = re.compile(r"^\s+(?:-\w, )?(--[\w-]+)(?: \[?<([^>]+)>\]?(?:\.\.\.)?)?(?:\s{2,}(\S.*))?\s*$")
TAGS = re.compile(r"\s*\[(env|default|possible values|aliases): ([^\]]*)\]")


def flags(bin_dir, cmd):
    """[(flag, value name, env, default, help)] from `cmd --help`, in its order."""
    text = subprocess.run([str(bin_dir / cmd[0]), *cmd[1:], "--help"], capture_output=True, text=True,
                          check=True).stdout
    out, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        m = FLAG.match(line)
        if not m or m.group(1) in ("--help", "--version"):
            continue
        body, values = [m.group(3) or ""], []
        # The help text: the indented lines up to the next flag or section. Long help
        # (doc comments of several paragraphs) separates its parts with blank lines and
        # lists possible values as "- value: meaning" lines.
        for more in lines[i + 1:]:
            if FLAG.match(more) or (more.strip() and not more.startswith("   ")):
                break
            item = re.match(r"^\s+- ([\w-]+)(?::|$)", more)
            if item:
                values.append(item.group(1))
            elif more.strip() != "Possible values:":
                body.append(more.strip())
        help_text = " ".join(b for b in body if b)
        tags = dict(TAGS.findall(help_text))
        if values and "possible values" not in tags:
            tags["possible values"] = ", ".join(values)
        help_text = TAGS.sub("", help_text).strip()
        env = tags.get("env", "").rstrip("=").split("=")[0]
        value = m.group(2) or ""
        if tags.get("possible values"):
            value = tags["possible values"].replace(", ", "|")
        out.append((m.group(1), value, env, tags.get("default", ""), help_text))
    return out


def table(rows):
    # Table cells: a bare | ends the cell, <dir> would be read as an HTML tag.
    cell = lambda s: s.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")  # noqa: E731
    lines = ["| flag | env | default | meaning |", "|---|---|---|---|"]
    for flag, value, env, default, help_text in rows:
        name = f"`{flag} {value}`" if value else f"`{flag}`"
        lines.append(f"| {cell(name)} | {f'`{env}`' if env else ''} | {cell(default)} | {cell(help_text)} |")
    return "\n".join(lines)


def render(bin_dir, text):
    worker = flags(bin_dir, ["infermesh-worker"])
    gateway = flags(bin_dir, ["infermesh-gateway"])
    both = {r[0] for r in worker} & {r[0] for r in gateway}
    shared = [r for r in worker if r[0] in both]
    for marker, cmd in TABLES:
        if marker == "shared":
            rows = shared
        else:
            rows = [r for r in flags(bin_dir, cmd) if cmd[0] == "infermesh" or r[0] not in both]
        begin, end = f"<!-- flags:{marker} (scripts/config-docs.py) -->", f"<!-- /flags:{marker} -->"
        pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
        if not pattern.search(text):
            sys.exit(f"{DOC}: no {begin} ... {end} section")
        text = pattern.sub(lambda _: f"{begin}\n{table(rows)}\n{end}", text)
    return text


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--bin-dir", default=str(ROOT / "target" / "debug"))
    args = ap.parse_args()
    old = DOC.read_text()
    new = render(pathlib.Path(args.bin_dir), old)
    if args.check:
        if new != old:
            sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), new.splitlines(True),
                                                       "docs/configuration.md", "from --help"))
            sys.exit(1)
        return
    DOC.write_text(new)


if __name__ == "__main__":
    main()
