"""Captioning metrics: CIDEr-D and BLEU-4 as coco-caption computes them, SPICE when available.

The VirTex paper reports CIDEr and SPICE on COCO val2017 through ``pycocoevalcap``. capvis
re-implements the two pure-Python metrics here, so evaluation needs neither that package nor
Java, and matches its numbers on the same tokens (tests pin values from pycocoevalcap 1.2):

* **CIDEr-D** (``cider_scorer.py``): 1..4-gram TF-IDF vectors, document frequencies counted
  over the *references of the evaluated images only*, ``idf = log(n_images) - log(max(1, df))``,
  candidate weights clipped with ``min(hyp, ref)``, a Gaussian length penalty with sigma 6,
  cosine similarities averaged over n and over references, times 10. Quirk kept for parity:
  the "length" in the penalty is the number of *bigrams* (words - 1), as in coco-caption.
* **BLEU-4** (``bleu_scorer.py``): corpus-level, clipped n-gram precisions summed over images,
  brevity penalty with the "closest" reference length per image (ties: the shorter one), and
  coco-caption's 1e-9 / 1e-15 smoothing constants. Returned in 0..1; callers multiply by 100.

Tokenisation differs from coco-caption's on purpose: it runs the Java Stanford CoreNLP PTB
tokeniser and drops punctuation tokens; here a regex lower-cases, splits off English clitics
(``dog's`` -> ``dog 's``, ``don't`` -> ``do n't``) as PTB does, keeps intra-word hyphens and
slashes, and drops all other punctuation. On ordinary captions both give the same tokens; rare
cases (abbreviations with dots, unicode symbols, numbers like ``3.5``) can differ.

SPICE is not implemented; it runs only when a Java runtime and the SPICE 1.0 jar (with its
``lib/`` of Stanford CoreNLP jars) are present. Otherwise ``spice`` is None with a plain note.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

from capvis.errors import DataError

Ngrams = Counter  # Counter[tuple[str, ...]] of 1..n-grams

_CLITICS = re.compile(r"(\w)('s|'re|'ve|'ll|'d|'m)\b")
_NEGATION = re.compile(r"(\w)(n't)\b")
_TOKEN = re.compile(r"n't|'(?:s|re|ve|ll|d|m)\b|\w+(?:[-/]\w+)*")


def tokenize(text: str) -> list[str]:
    """Lower-case word tokens without punctuation (a regex stand-in for the PTB tokeniser)."""
    text = text.lower().replace("\u2019", "'")
    text = _NEGATION.sub(r"\1 \2", _CLITICS.sub(r"\1 \2", text))
    return [t.replace("_", "") for t in _TOKEN.findall(text) if t.replace("_", "")]


def _ngrams(words: Sequence[str], n: int = 4) -> Ngrams:
    counts: Ngrams = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i : i + k])] += 1
    return counts


# ----------------------------------------------------------------------------- CIDEr-D


def _tfidf(counts: Ngrams, df: Mapping[tuple, float], log_n_images: float, n: int):
    """TF-IDF vector per n-gram order, its norms, and the bigram count used as "length"."""
    vec: list[dict[tuple, float]] = [{} for _ in range(n)]
    norm = [0.0] * n
    for gram, tf in counts.items():
        k = len(gram) - 1
        w = float(tf) * (log_n_images - math.log(max(1.0, df.get(gram, 0.0))))
        vec[k][gram] = w
        norm[k] += w * w
    length = sum(tf for gram, tf in counts.items() if len(gram) == 2)  # coco-caption's quirk
    return vec, [math.sqrt(x) for x in norm], length


def _cider_sim(hyp, ref, n: int, sigma: float) -> list[float]:
    (vh, nh, lh), (vr, nr, lr) = hyp, ref
    penalty = math.exp(-float(lh - lr) ** 2 / (2 * sigma**2))
    out = []
    for k in range(n):
        val = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vh[k].items())
        if nh[k] != 0 and nr[k] != 0:
            val /= nh[k] * nr[k]
        out.append(val * penalty)
    return out


def cider_d(
    candidates: Mapping[Hashable, Sequence[str]],
    references: Mapping[Hashable, Sequence[Sequence[str]]],
    n: int = 4,
    sigma: float = 6.0,
) -> tuple[float, list[float]]:
    """CIDEr-D of tokenised captions: (corpus mean, per-image scores in ``candidates`` order)."""
    ids = list(candidates)
    cand = {i: _ngrams(candidates[i], n) for i in ids}
    refs = {i: [_ngrams(r, n) for r in references[i]] for i in ids}
    df: Counter = Counter()
    for i in ids:
        df.update(set().union(*(r.keys() for r in refs[i])))
    log_n = math.log(float(len(ids)))
    scores = []
    for i in ids:
        hyp = _tfidf(cand[i], df, log_n, n)
        total = [0.0] * n
        for r in refs[i]:
            sim = _cider_sim(hyp, _tfidf(r, df, log_n, n), n, sigma)
            total = [a + b for a, b in zip(total, sim)]
        scores.append(sum(total) / n / len(refs[i]) * 10.0)
    return (sum(scores) / len(scores) if scores else 0.0), scores


# ----------------------------------------------------------------------------- BLEU


def bleu(
    candidates: Mapping[Hashable, Sequence[str]],
    references: Mapping[Hashable, Sequence[Sequence[str]]],
    n: int = 4,
) -> list[float]:
    """Corpus BLEU-1..n of tokenised captions, coco-caption style (see module docstring)."""
    small, tiny = 1e-9, 1e-15
    correct, guess = [0] * n, [0] * n
    test_len = ref_len = 0
    for i in candidates:
        hyp = candidates[i]
        max_ref: Counter = Counter()
        for r in references[i]:
            max_ref |= _ngrams(r, n)  # element-wise max of counts
        for gram, c in _ngrams(hyp, n).items():
            correct[len(gram) - 1] += min(max_ref.get(gram, 0), c)
        for k in range(n):
            guess[k] += max(0, len(hyp) - k)
        test_len += len(hyp)
        lens = [len(r) for r in references[i]]
        ref_len += min((abs(x - len(hyp)), x) for x in lens)[1]  # "closest", ties: shorter
    scores, prod = [], 1.0
    for k in range(n):
        prod *= (correct[k] + tiny) / (guess[k] + small)
        scores.append(prod ** (1.0 / (k + 1)))
    ratio = (test_len + tiny) / (ref_len + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


# ----------------------------------------------------------------------------- SPICE


def run_spice(
    candidates: Mapping[Hashable, Sequence[str]],
    references: Mapping[Hashable, Sequence[Sequence[str]]],
    *,
    jar: str | Path | None = None,
    java: str | None = None,
) -> tuple[float | None, str | None]:
    """SPICE F-score through the official jar, or (None, reason) when it cannot run.

    The jar is ``jar`` or ``$CAPVIS_SPICE_JAR``; Java is ``java`` or the ``java`` on PATH.
    """
    java = java if java is not None else shutil.which("java")
    if not java or not shutil.which(java):
        return None, "SPICE skipped: no Java runtime"
    jar = jar if jar is not None else os.environ.get("CAPVIS_SPICE_JAR")
    if not jar or not Path(jar).is_file():
        return None, "SPICE skipped: no SPICE jar (set CAPVIS_SPICE_JAR to spice-1.0.jar)"
    items = [
        {"image_id": str(i), "test": " ".join(candidates[i]),
         "refs": [" ".join(r) for r in references[i]]}
        for i in candidates
    ]
    with tempfile.TemporaryDirectory(prefix="capvis_spice_") as tmp:
        src, out = Path(tmp) / "in.json", Path(tmp) / "out.json"
        src.write_text(json.dumps(items))
        cmd = [java, "-jar", "-Xmx8G", str(jar), str(src), "-cache", str(Path(tmp) / "cache"),
               "-out", str(out), "-subset", "-silent"]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(jar).parent)
        if proc.returncode != 0 or not out.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            return None, f"SPICE failed (exit {proc.returncode}): {tail[0]}"
        results = json.loads(out.read_text())
    f_scores = [r["scores"]["All"]["f"] for r in results]
    return sum(f_scores) / len(f_scores), None


# ----------------------------------------------------------------------------- entry point


def _tokenised(
    candidates: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]
) -> tuple[dict, dict]:
    if not candidates:
        raise DataError("no candidate captions to evaluate")
    missing = [i for i in candidates if not references.get(i)]
    if missing:
        raise DataError(
            f"{len(missing)} candidate image ids have no reference captions, first: {missing[0]!r}"
        )
    cand = {i: tokenize(c) for i, c in candidates.items()}
    refs = {i: [tokenize(r) for r in references[i]] for i in candidates}
    return cand, refs


def evaluate_captions(
    candidates: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    *,
    spice: bool = True,
    spice_jar: str | Path | None = None,
    java: str | None = None,
) -> dict:
    """CIDEr-D, BLEU-4 and (if possible) SPICE of one caption per image against its references.

    The evaluated set is the keys of ``candidates``; references of other images are ignored
    (they would change CIDEr-D's document frequencies). Scores are raw, as pycocoevalcap
    returns them; the paper's tables show x100 (e.g. CIDEr 94.0 is 0.940 here).

    Returns:
        ``{"cider", "bleu4", "spice" (None if skipped), "notes" (list of plain messages)}``.
    """
    cand, refs = _tokenised(candidates, references)
    notes = ["tokenised with capvis' regex tokeniser, not the Java PTB tokeniser"]
    cider, _ = cider_d(cand, refs)
    spice_score = None
    if spice:
        spice_score, note = run_spice(cand, refs, jar=spice_jar, java=java)
        if note:
            notes.append(note)
    else:
        notes.append("SPICE skipped: disabled")
    return {"cider": cider, "bleu4": bleu(cand, refs)[3], "spice": spice_score, "notes": notes}
