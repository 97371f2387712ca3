"""Seeded text perturbations for robustness evaluation (`--noise char,word --rates 0,0.05,0.1,0.2`).

`char` noise makes typos: each letter is, with probability `rate`, deleted, replaced by a neighbour on
the keyboard, duplicated, or swapped with the next one. `word` noise acts on whole words: each word is,
with probability `rate`, deleted, swapped with the next, or duplicated. The same (text, kind, rate, seed)
always gives the same result, whatever else ran before (each call has its own generator).
"""

from __future__ import annotations

import hashlib
import random
import re
from typing import Literal

from haina.core.errors import HainaError

NoiseKind = Literal["char", "word"]
KINDS = ("char", "word")

_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
_NEIGHBOURS: dict[str, str] = {}
for _r, _row in enumerate(_ROWS):
    for _c, _ch in enumerate(_row):
        near = [_row[j] for j in (_c - 1, _c + 1) if 0 <= j < len(_row)]
        near += [_ROWS[r][_c] for r in (_r - 1, _r + 1) if 0 <= r < len(_ROWS) and _c < len(_ROWS[r])]
        _NEIGHBOURS[_ch] = "".join(near)


def _rng(text: str, kind: str, rate: float, seed: int) -> random.Random:
    # Seeded by the text too: perturbing example 7 does not depend on how many examples came before it.
    key = hashlib.blake2b(f"{kind}\0{rate!r}\0{seed}\0{text}".encode("utf-8", "surrogatepass"), digest_size=8)
    return random.Random(int.from_bytes(key.digest(), "big"))


def _typo(ch: str, rng: random.Random) -> str:
    lower = ch.lower()
    near = _NEIGHBOURS.get(lower)
    if not near:
        return ch
    new = rng.choice(near)
    return new.upper() if ch.isupper() else new


def _char_noise(text: str, rate: float, rng: random.Random) -> str:
    chars = list(text)
    out: list[str] = []
    i = 0
    while i < len(chars):
        ch = chars[i]
        if ch.isalpha() and rng.random() < rate:
            op = rng.randrange(4)
            if op == 0:  # deletion
                i += 1
                continue
            if op == 1:  # keyboard neighbour
                out.append(_typo(ch, rng))
            elif op == 2:  # duplication
                out += [ch, ch]
            elif i + 1 < len(chars):  # swap with the next character
                out += [chars[i + 1], ch]
                i += 2
                continue
            else:
                out.append(ch)
        else:
            out.append(ch)
        i += 1
    return "".join(out)


def _word_noise(text: str, rate: float, rng: random.Random) -> str:
    # Split into words and the whitespace between them, so perturbed text keeps its line breaks.
    parts = re.split(r"(\s+)", text)
    words = [p for p in parts if p and not p.isspace()]
    out: list[str] = []
    i = 0
    while i < len(words):
        w = words[i]
        if rng.random() < rate:
            op = rng.randrange(3)
            if op == 0:  # deletion
                i += 1
                continue
            if op == 1 and i + 1 < len(words):  # swap with the next word
                out += [words[i + 1], w]
                i += 2
                continue
            out += [w, w] if op == 2 else [w]  # duplication
        else:
            out.append(w)
        i += 1
    return " ".join(out)


def perturb(text: str, kind: NoiseKind, rate: float, seed: int = 0) -> str:
    """`text` with `kind` noise at `rate` (0 returns it unchanged); deterministic in (text, kind, rate, seed)."""
    if kind not in KINDS:
        raise HainaError(f"unknown noise '{kind}'; choose from {', '.join(KINDS)}")
    if not 0.0 <= rate <= 1.0:
        raise HainaError(f"noise rate {rate} is not in [0, 1]")
    if rate == 0.0 or not text:
        return text
    rng = _rng(text, kind, rate, seed)
    return _char_noise(text, rate, rng) if kind == "char" else _word_noise(text, rate, rng)


def noise_grid(noise: list[str] | None, rates: list[float] | None) -> list[tuple[str, float]]:
    """The (kind, rate) settings that `--noise` and `--rates` ask for, rate 0 (clean) first; [] without --noise.

    `--noise char,word` and `--noise char word` both work; `--rates` defaults to 0, 0.05, 0.1, 0.2.
    """
    if not noise:
        if rates:
            raise HainaError("--rates needs --noise (char, word or both)")
        return []
    kinds = [k.strip() for item in noise for k in str(item).split(",") if k.strip()]
    for k in kinds:
        if k not in KINDS:
            raise HainaError(f"--noise {k} is not one of {', '.join(KINDS)}")
    values = sorted(set(rates if rates else [0.0, 0.05, 0.1, 0.2]))
    for r in values:
        if not 0.0 <= r <= 1.0:
            raise HainaError(f"--rates {r} is not in [0, 1]")
    grid = [("clean", 0.0)] if 0.0 in values else []
    return grid + [(k, r) for k in dict.fromkeys(kinds) for r in values if r > 0.0]


def plot_metric_vs_noise(rows: list[tuple[str, float, float]], metric: str, path, title: str = "") -> None:
    """A PNG of `metric` against the noise rate, one line per kind (the clean run is rate 0 of every line).

    Args:
        rows: (kind, rate, value) triples as `noise_grid` ordered them; kind "clean" is rate 0.
        metric: the metric's name (the y axis).
        path: the PNG to write.
        title: the figure's title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clean = [v for k, _, v in rows if k == "clean"]
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    for kind in dict.fromkeys(k for k, _, _ in rows if k != "clean"):
        pts = ([(0.0, clean[0])] if clean else []) + [(r, v) for k, r, v in rows if k == kind]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{kind} noise")
    ax.set_xlabel("noise rate")
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} against noise")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
