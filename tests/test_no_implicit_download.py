"""Data arrives only through the download rules: no library call fetches it behind their back."""
from __future__ import annotations

import re


def test_no_download_true_anywhere_in_the_package(repo_root):
    offenders = []
    for path in sorted((repo_root / "pipeline").rglob("*.py")):
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"download\s*=\s*True", line):
                offenders.append(f"{path.relative_to(repo_root)}:{lineno}: {line.strip()}")
    assert not offenders, "implicit downloads:\n" + "\n".join(offenders)


def test_only_the_shared_download_module_opens_urls(repo_root):
    """urllib / requests appear only in pipeline/data/download.py, the one download path."""
    users = {str(p.relative_to(repo_root)) for p in (repo_root / "pipeline").rglob("*.py")
             if re.search(r"^\s*(import|from)\s+(urllib\.request|requests|http\.client)\b",
                          p.read_text(), re.M)}
    assert users <= {"pipeline/data/download.py"}, users
