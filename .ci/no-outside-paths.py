#!/usr/bin/env python3
"""Fails when a tracked file refers to a path outside the repository.

The repository must carry everything its tests and docs need: a fresh clone into an empty folder
has nothing beside it. Three kinds of reference are refused:
  * absolute paths of a build machine (/work/..., /home/..., /root/..., /Users/..., C:\\...);
  * the old location of the protocol contract, a `shared/` folder beside the checkout;
  * relative paths whose `../` steps climb above the repository root from the file's folder
    (Markdown links and scripts resolve against the file's folder).
Prints every offending line as FILE:LINE: TEXT and exits 1 if there is any.

`--self-test` checks the checker: it builds a throwaway repository with references it must
refuse and ones it must let pass, runs itself there, and fails unless it reports exactly the
bad ones (.ci/run runs it before the real check).
"""
import os
import re
import subprocess
import sys

ROOT = subprocess.run(
    ["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True
).stdout.strip()
SELF = os.path.relpath(os.path.abspath(__file__), ROOT)

ABSOLUTE = re.compile(r"(?<![\w.~-])(/work/|/home/\w|/root/|/Users/\w|[A-Z]:\\\\)")
SHARED = re.compile(r"(\.\./)+shared/|(?<![\w-])shared/(PROTOCOL|golden-vectors|STYLE)")
RELATIVE = re.compile(r"(?:\.\./)+")


def escapes(rel_file: str, match: str) -> bool:
    depth = rel_file.count("/")  # folders between the root and the file
    return match.count("../") > depth


def main() -> int:
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    bad = []
    for f in files:
        name = f.decode()
        if not name or name == SELF or name == "Cargo.lock":
            continue
        try:
            with open(os.path.join(ROOT, name), encoding="utf-8") as fh:
                lines = fh.readlines()
        except (UnicodeDecodeError, IsADirectoryError, FileNotFoundError):
            continue  # binary files (screenshots) hold no paths
        for no, line in enumerate(lines, 1):
            hit = ABSOLUTE.search(line) or SHARED.search(line)
            if not hit:
                hit = next((m for m in RELATIVE.finditer(line) if escapes(name, m.group(0))), None)
            if hit:
                bad.append(f"{name}:{no}: {line.strip()}")
    if bad:
        print("tracked files refer to paths outside the repository:", file=sys.stderr)
        for b in bad:
            print("  " + b, file=sys.stderr)
        return 1
    print(f"no tracked file refers outside the repository ({len(files) - 1} files checked)")
    return 0


# (path, text, refused?) for --self-test. The refused samples are put together from pieces, so
# that this file itself names no path outside the repository (other checkers read it too).
_UP, _SH = "..", "shared"
SELF_TEST_FILES = [
    ("proto-core/tests/vectors.rs", f'read("{_UP}/{_UP}/{_SH}/golden-vectors.json")', True),
    ("docs/ARCHITECTURE.md", f"the contract: {_UP}/{_SH}/PROTOCOL.md", True),
    ("README.md", f"style: {_SH}/STYLE.md", True),
    ("docs/notes.md", "built in " + "/".join(["", "work", "i13", "target"]), True),
    ("sim/run.sh", "cd " + "/".join(["", "home", "ci", "ddpush-rs"]) + " && cargo test", True),
    ("tests/deep/x.rs", f'include_str!("{_UP}/{_UP}/{_UP}/outside.txt")', True),
    ("docs/ok.md", "see [the README](../README.md) and ../proto-core/src/lib.rs", False),
    ("tests/deep/ok.rs", 'include_str!("../../docs/ok.md")', False),
    ("docs/url.md", "https://example.org/work/x and ~/.cargo/bin", False),
]


def self_test() -> int:
    import tempfile

    with tempfile.TemporaryDirectory() as root:
        for path, text, _ in SELF_TEST_FILES:
            full = os.path.join(root, path)
            os.makedirs(os.path.dirname(full), exist_ok=True)
            with open(full, "w", encoding="utf-8") as fh:
                fh.write(f"first line\n{text}\n")
        subprocess.run(["git", "init", "-q"], cwd=root, check=True)
        subprocess.run(["git", "add", "-A"], cwd=root, check=True)
        run = subprocess.run(
            [sys.executable, os.path.abspath(__file__)],
            cwd=root,
            capture_output=True,
            text=True,
        )
    reported = {line.strip().split(":")[0] for line in run.stderr.splitlines()[1:]}
    want = {path for path, _, bad in SELF_TEST_FILES if bad}
    if run.returncode != 1 or reported != want:
        print(
            f"self-test failed: exit {run.returncode}, reported {sorted(reported)}, "
            f"expected {sorted(want)}\n{run.stdout}{run.stderr}",
            file=sys.stderr,
        )
        return 1
    print(f"self-test: all {len(want)} outside references refused, the rest passed")
    return 0


if __name__ == "__main__":
    sys.exit(self_test() if sys.argv[1:] == ["--self-test"] else main())
