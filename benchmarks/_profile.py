"""Summarize py-spy's collapsed stacks (``--format raw``): where the samples are.

    python -m benchmarks._profile FILE [--top 25] [--match hub.py]

Prints, per function, the share of samples with it on top of the stack (self)
and anywhere in it (inclusive), largest first. Idle samples (py-spy records
only active threads unless ``--idle``) are excluded by py-spy itself.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

FOCUS = ("controlplane/", "agents/", "grpc/")
"""The inclusive list shows these frames only (the loop and runner frames are in all)."""
_LINE = re.compile(r"^(.*) (\d+)$")
_LINENO = re.compile(r":\d+\)$")


def _frame(frame: str) -> str:
    # "write (grpc/_cython/...pyx:123)" -> "write (grpc/_cython/...pyx)": one per function.
    return _LINENO.sub(")", frame.strip())


def summarize(path: Path) -> tuple[int, Counter[str], Counter[str]]:
    """(total samples, self samples per function, inclusive samples per function)."""
    total = 0
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        match = _LINE.match(line)
        if not match:
            continue
        count = int(match.group(2))
        frames = [_frame(f) for f in match.group(1).split(";") if f]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    return total, own, inclusive


def report(path: Path, top: int = 25, match: str = "") -> str:
    """The summary as text."""
    total, own, inclusive = summarize(path)
    lines = [f"{path}: {total} samples"]
    for title, counts, focus in (("self", own, ("",)), ("inclusive", inclusive, FOCUS)):
        lines.append(f"-- {title}" + ("" if focus == ("",) else f" ({', '.join(focus)} only)"))
        shown = [
            (f, c) for f, c in counts.most_common() if match in f and any(x in f for x in focus)
        ][:top]
        lines += [f"{100 * c / max(total, 1):6.1f}%  {f}" for f, c in shown]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("file", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--match", default="", help="only functions whose frame contains this")
    args = parser.parse_args(argv)
    print(report(args.file, args.top, args.match))


if __name__ == "__main__":
    main()
