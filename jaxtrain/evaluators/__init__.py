"""Evaluator types by name, and building a run's evaluators from `config.evals`.

Built-in types: ``retrieval`` and ``zero_shot`` (contrastive task), ``perplexity`` (LM task),
``preference`` (DPO task), ``generation`` (LM and DPO tasks: decoded completions scored by
BLEU / ROUGE / exact match), ``information_retrieval`` (contrastive task: nDCG@10, MRR@10,
recall@k of queries over a corpus, built-in or an MTEB-layout directory). Add one with
:func:`register_evaluator` (a subclass of :class:`jaxtrain.evaluator.Evaluator` with a unique
`type`).
"""

from __future__ import annotations

from typing import Any

import ml_collections

from jaxtrain.evaluator import Evaluator, check_requirements, evaluator_schema, resolved_config
from jaxtrain.registry import Registry

EVALUATORS = Registry("evaluator", "evals.<name>.type", {
    "retrieval": "jaxtrain.evaluators.retrieval:RetrievalEvaluator",
    "zero_shot": "jaxtrain.evaluators.zero_shot:ZeroShotEvaluator",
    "perplexity": "jaxtrain.evaluators.perplexity:PerplexityEvaluator",
    "preference": "jaxtrain.evaluators.preference:PreferenceEvaluator",
    "generation": "jaxtrain.evaluators.generation:GenerationEvaluator",
    "information_retrieval":
        "jaxtrain.evaluators.information_retrieval:InformationRetrievalEvaluator",
})


def register_evaluator(cls: type[Evaluator]) -> type[Evaluator]:
    """Make `evals.<name>.type = cls.type` find `cls` (usable as a class decorator)."""
    return EVALUATORS.register(cls.type, cls)


def get_evaluator(type_name: str) -> type[Evaluator]:
    return EVALUATORS.get(type_name)


def eval_config(type_name: str, **overrides: Any) -> ml_collections.ConfigDict:
    """A full `evals.<name>` block of type `type_name`: its defaults, then `overrides`."""
    block = evaluator_schema(get_evaluator(type_name))
    block.update(overrides)
    return block


def build_evaluators(config: ml_collections.ConfigDict, task: Any) -> dict[str, Evaluator]:
    """One evaluator per `config.evals` entry, its block checked against its type's keys."""
    out = {}
    for name in config.evals:
        block = config.evals[name]
        cls = EVALUATORS.get(block.type)
        check_requirements(name, cls, task)
        out[name] = cls(name, resolved_config(name, block, cls), task)
    return out


__all__ = ["EVALUATORS", "Evaluator", "build_evaluators", "eval_config", "get_evaluator",
           "register_evaluator"]
