"""The documents stay true to the code: the flag tables of docs/configuration.md equal the
binaries' --help, and every document that code, scripts or docs point to exists."""
import pathlib
import re
import subprocess
import sys

from conftest import ROOT, binary


def test_configuration_md_equals_the_binaries_help():
    bin_dir = pathlib.Path(binary("infermesh-worker")).parent
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "config-docs.py"), "--check", "--bin-dir", str(bin_dir)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, "docs/configuration.md differs from --help; run scripts/config-docs.py\n" + out.stdout[-3000:]


def tracked():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [ROOT / f for f in files if f.endswith((".rs", ".sh", ".py", ".md", ".yaml", ".toml", ".js", ".proto"))
            or f.startswith("Dockerfile")]


def test_every_document_pointed_to_exists():
    missing = []
    names = {str(p.relative_to(ROOT)) for p in tracked()}
    for path in tracked():
        if not path.exists():
            continue
        text = path.read_text(errors="replace")
        # Paths like docs/limits.md in code and scripts, and relative links in documents.
        for ref in re.findall(r"\b((?:docs/)?[\w-]+\.md)\b", text):
            # A path from the root or from the file, or a file of that name (bench/results/peers.md).
            candidates = [ROOT / ref, path.parent / ref]
            if not any(c.exists() for c in candidates) and not any(n.endswith("/" + ref) for n in names):
                missing.append(f"{path.relative_to(ROOT)}: {ref}")
    assert not missing, missing
