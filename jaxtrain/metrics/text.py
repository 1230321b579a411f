"""Text-generation metrics of completions against references, by the well-kept libraries.

- ``bleu``: sacrebleu's corpus BLEU (0-100), its default ``13a`` tokenisation, one reference
  per completion: ``BP · exp(Σ_{n=1..4} ¼ log p_n)`` with p_n the corpus n-gram precisions
  and BP = min(1, exp(1 − |refs| / |hyps|)) (Papineni et al. 2002; Post 2018).
- ``rouge1``, ``rouge2``, ``rougeL``: rouge-score's F-measure (0-1), averaged over the pairs:
  F = 2PR / (P + R) of unigram, bigram and longest-common-subsequence overlap (Lin 2004),
  rouge-score's default tokenizer (lower-cased, non-alphanumerics dropped), no stemming.
- ``exact_match``: the fraction of completions equal to their reference once surrounding
  whitespace is stripped and inner whitespace runs are one space.

sacrebleu and rouge-score are imported on first use.
"""

from __future__ import annotations

from collections.abc import Sequence

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def normalize_whitespace(text: str) -> str:
    """``text`` stripped, with every run of whitespace one space."""
    return " ".join(text.split())


def _check(completions: Sequence[str], references: Sequence[str]) -> None:
    if len(completions) != len(references):
        raise ValueError(f"{len(completions)} completions but {len(references)} references: "
                         "give one reference per completion.")
    if not completions:
        raise ValueError("No completions to score.")


def bleu(completions: Sequence[str], references: Sequence[str]) -> float:
    """sacrebleu corpus BLEU (0-100) of `completions` against one reference each."""
    import sacrebleu

    _check(completions, references)
    return float(sacrebleu.corpus_bleu(list(completions), [list(references)]).score)


def rouge(completions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean rouge-score F-measure of each of :data:`ROUGE_TYPES` (0-1)."""
    from rouge_score import rouge_scorer

    _check(completions, references)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=False)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for completion, reference in zip(completions, references, strict=True):
        scores = scorer.score(reference, completion)  # (target, prediction)
        for t in ROUGE_TYPES:
            totals[t] += scores[t].fmeasure
    return {t: totals[t] / len(completions) for t in ROUGE_TYPES}


def exact_match(completions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of completions equal to their reference (:func:`normalize_whitespace`d)."""
    _check(completions, references)
    same = sum(normalize_whitespace(c) == normalize_whitespace(r)
               for c, r in zip(completions, references, strict=True))
    return same / len(completions)


def text_metrics(completions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """``bleu``, ``rouge1``, ``rouge2``, ``rougeL`` and ``exact_match`` (module docstring)."""
    return {"bleu": bleu(completions, references), **rouge(completions, references),
            "exact_match": exact_match(completions, references)}
