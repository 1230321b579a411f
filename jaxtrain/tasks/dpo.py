"""Direct preference optimisation of a causal LM against a frozen reference.

Each example is a prompt with a chosen and a rejected response. The policy scores both in one
forward pass (chosen and rejected rows concatenated); a sequence's log-prob sums
log p(token) over its response tokens only. The reference (``dpo.reference``) is

* ``model``: a frozen copy of the starting policy in ``frozen["reference"]``, sharded like the
  policy; with LoRA (``lora.rank > 0``) the base weights (adapters off) are the reference and no
  copy is kept;
* ``precomputed``: log-probs stored with the dataset (``ref_chosen_logps`` /
  ``ref_rejected_logps`` columns), or computed once from the starting weights when the rows are
  built and cached with them — no reference model in memory while training;
* ``none``: reference-free (reference log-probs 0).

Losses (``dpo.loss_type``): see :mod:`jaxtrain.losses.preference`. Metrics follow TRL's names
(``rewards/chosen``, ``rewards/accuracies``, ``logps/chosen``, ...), plus ``kl``: the per-token
KL(π(·|context) ‖ π_ref(·|context)) over the whole vocabulary, averaged over the chosen and
rejected response tokens (with a reference model; precomputed log-probs cannot give it).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from ml_collections import config_dict

from jaxtrain.config import ConfigError, base_config
from jaxtrain.data.sanity import MIN_EVAL_PREFERENCE_PAIRS, check_eval_rows, on_bad_row_rule
from jaxtrain.evaluators import eval_config
from jaxtrain.losses.lm import token_kl
from jaxtrain.losses.preference import LOSS_TYPES, preference_loss, sequence_logps
from jaxtrain.models.registry import CAUSAL_LM, get_model, model_schema
from jaxtrain.task import Task, params_key
from jaxtrain.weights import starting_model

SIDES = ("chosen", "rejected")
ROW = ("inputs", "targets", "loss_mask", "positions", "segment_ids")


class DPOTask(Task):
    name = "dpo"
    activation_sharding = True

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        c = base_config()
        c.task = cls.name
        model = get_model("llama").default_config()  # model.name: any causal LM family
        model["attention_impl"] = config_dict.placeholder(str)
        c.model = ml_collections.ConfigDict(model)
        c.init_from = ""  # the starting policy: a jaxtrain workdir (e.g. runs/sft) or HF dir
        c.data = ml_collections.ConfigDict(dict(
            source="builtin",  # built-in arithmetic pairs | local json/jsonl/parquet/arrow | hub
            eval_source="",  # a separate eval set (all of it); default: the validation split
            split="train",  # the training split spec: 'train_prefs', 'train[:10%]', 'a+b'
            eval_split="",  # the held-out split spec; '' = 'validation' (undivided: every 50th)
            subset="",  # the dataset config name (hub / local README configs / sub-folder)
            tokenizer="gpt2",
            max_length=64,  # prompt + response tokens
            max_prompt_length=48,  # longer prompts keep their end
            max_documents=0,  # use at most this many pairs (0 = all)
            train_examples=2000,  # built-in sizes
            eval_examples=200,
            eval_rows=256,  # evaluate on at most this many held-out pairs (0 = all)
            streaming=False,  # read and tokenise the pairs as training consumes them
            cache_dir="",
            on_bad_row="error",  # a bad row: 'error' (names file and row) | 'skip' (dropped)
        ))
        c.dpo = ml_collections.ConfigDict(dict(
            beta=0.1, loss_type="sigmoid", label_smoothing=0.0, reference="model"))
        c.eval.batch_size = 64
        c.evals.val = eval_config("preference")  # eval/val/rewards/accuracy, eval/val/loss, ...
        return c

    @classmethod
    def schema(cls, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
        """The defaults, with the `model` keys of the family `model.name` names."""
        c = cls.default_config()
        c.model = ml_collections.ConfigDict(model_schema(c.model, config.model, CAUSAL_LM))
        return c

    @classmethod
    def config_rules(cls):
        return [
            ("dpo.beta", lambda v: v > 0, "must be > 0"),
            ("dpo.loss_type", lambda v: v in LOSS_TYPES, f"must be one of {LOSS_TYPES}"),
            ("dpo.label_smoothing", lambda v: 0 <= v < 0.5, "must be in [0, 0.5)"),
            ("dpo.reference", lambda v: v in ("model", "precomputed", "none"),
             "must be 'model', 'precomputed' or 'none'"),
            ("data.max_length", lambda v: v > 1, "must be > 1"),
            ("data.max_prompt_length", lambda v: v >= 1, "must be >= 1"),
            ("data.eval_rows", lambda v: v >= 0, "must be >= 0 (0 = all)"),
            on_bad_row_rule(),
        ]

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        if config.data.max_prompt_length >= config.data.max_length:
            raise ConfigError(
                f"data.max_prompt_length ({config.data.max_prompt_length}) must be smaller than "
                f"data.max_length ({config.data.max_length}): responses need room."
            )
        if config.dpo.label_smoothing and config.dpo.loss_type not in ("sigmoid", "robust"):
            raise ConfigError(
                f"dpo.label_smoothing ({config.dpo.label_smoothing}) applies to the 'sigmoid' and "
                f"'robust' losses only, not {config.dpo.loss_type!r}: set it to 0."
            )
        self.family = get_model(config.model.name, kind=CAUSAL_LM)
        self.model_config, self._init_weights, _ = starting_model(
            self.family, config.model.to_dict(), config.init_from)
        self.model = self.family.module(self.model_config)
        self.lora = bool(config.lora.rank)
        # A separate frozen copy only when needed: LoRA's base already is the start policy.
        self.keep_reference = config.dpo.reference == "model" and not self.lora
        self._tokenizer = None
        self._train_arrays: dict[str, np.ndarray] | None = None  # _train_rows, once built

    # ------------------------------------------------------------------ model

    def init_params(self, rng):
        return self.family.init(self.model_config, rng)

    def init_frozen(self, rng):
        if not self.keep_reference:
            return {}
        # the starting policy: the same init as the params (replaced by init_from's weights)
        return {"reference": self.family.init(self.model_config, params_key(self.config.seed))}

    def pretrained(self) -> dict[str, Any]:
        if self._init_weights is None:
            return {}
        out = {"params": self._init_weights}
        if self.keep_reference:
            out["frozen"] = {"reference": self._init_weights}
        return out

    def _forward(self, params, batch) -> tuple[jax.Array, dict]:
        """Logits of chosen and rejected rows in one pass: ([2B, T, V], the stacked rows)."""
        both = {k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]]) for k in ROW}
        logits, _ = self.model.apply({"params": params}, both["inputs"], both["positions"],
                                     both["segment_ids"])
        return logits, both

    def _logps(self, params, batch) -> tuple[jax.Array, ...]:
        """(policy log-probs chosen [B], rejected [B], response tokens chosen [B], rejected [B])."""
        logits, both = self._forward(params, batch)
        return _split(*sequence_logps(logits, both["targets"], both["loss_mask"]))

    def compare(self, params, batch, frozen) -> dict[str, jax.Array]:
        """Per pair: policy and reference log-probs of chosen and rejected (``pc``, ``pr``,
        ``rc``, ``rr``), response tokens, and the summed per-token KL(π ‖ π_ref) over the
        response tokens (``kl``; a reference model only: full distributions are needed)."""
        logits, both = self._forward(params, batch)
        pc, pr, nc, nr = _split(*sequence_logps(logits, both["targets"], both["loss_mask"]))
        out = {"pc": pc, "pr": pr, "tokens": nc + nr}
        mode = self.config.dpo.reference
        if mode == "precomputed":
            out["rc"], out["rr"] = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        elif mode == "none":
            out["rc"] = out["rr"] = jnp.zeros_like(pc)
        else:
            ref = frozen["reference"] if self.keep_reference else frozen["lora_base"]
            ref_logits = jax.lax.stop_gradient(self._forward(ref, batch)[0])
            rc, rr, _, _ = _split(*sequence_logps(ref_logits, both["targets"],
                                                  both["loss_mask"]))
            out["rc"], out["rr"] = rc, rr
            kl = jnp.sum(token_kl(logits, ref_logits) * both["loss_mask"], axis=-1)
            kc, kr, _, _ = _split(kl, kl)
            out["kl"] = kc + kr
        return out

    def loss_fn(self, params, batch, rng, frozen):
        o = self.compare(params, batch, frozen)
        d = self.config.dpo
        loss, metrics = preference_loss(o["pc"], o["pr"], o["rc"], o["rr"], beta=d.beta,
                                        loss_type=d.loss_type, label_smoothing=d.label_smoothing)
        if "kl" in o:
            metrics["kl"] = jnp.sum(o["kl"]) / jnp.maximum(jnp.sum(o["tokens"]), 1.0)
        return loss, metrics

    def step_tokens(self, batch) -> int:
        return 2 * int(np.prod(batch["chosen_inputs"].shape))

    def model_flops_per_step(self, batch) -> float:
        """Policy training on chosen + rejected rows, plus the reference's forward pass (the
        model family's FLOP formula; 0, XLA's count, for a family without one)."""
        if self.family.flops_per_token is None:
            return 0.0
        rows, length = batch["chosen_inputs"].shape
        per_token = self.family.flops_per_token(self.model_config, length)
        flops = 2 * rows * length * per_token
        if self.config.dpo.reference == "model":
            flops += 2 * rows * length * per_token / 3
        return flops

    # ------------------------------------------------------------------ data

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from jaxtrain.data.tokenizers import load_lm_tokenizer

            self._tokenizer = load_lm_tokenizer(self.config.data.tokenizer,
                                                self.model_config.vocab_size)
        return self._tokenizer

    def _rows(self, split: str, source: str = "") -> dict[str, np.ndarray]:
        from jaxtrain.data import preference, text
        from jaxtrain.data.sources import split_source, subset_of

        d = self.config.data
        source, split_name = (source, "all") if source else split_source(d, split)
        limit = d.max_documents or None
        if source == preference.BUILTIN_PREFERENCE:
            limit = d.train_examples if split == "train" else d.eval_examples
        examples = preference.load_preference_examples(source, split=split_name, n=limit,
                                                       seed=self.config.seed,
                                                       on_bad_row=d.get("on_bad_row", "error"),
                                                       subset=subset_of(d, source))
        tok = self.tokenizer
        precompute = self.config.dpo.reference == "precomputed"

        def build():
            rows = preference.preference_rows(examples, tok, max_length=d.max_length,
                                              max_prompt_length=d.max_prompt_length)
            if precompute and "ref_chosen_logps" not in rows:
                rows.update(self._reference_logps(rows))
            return rows

        key = text.rows_cache_key(
            source=source, split=split_name, tokenizer_name=d.tokenizer, tokenizer=tok,
            seq_len=d.max_length, mode="preference",
            documents=[json.dumps(e, sort_keys=True, default=str) for e in examples],
            max_prompt_length=d.max_prompt_length,
            reference=_weights_fingerprint(self.config.init_from) if precompute else None)
        rows = text.cached_rows(key, build, d.cache_dir or None)
        if precompute and "ref_chosen_logps" not in rows:
            raise ValueError("dpo.reference='precomputed' but the rows have no reference "
                             "log-probs.")
        if split != "train":
            check_eval_rows(
                f"{source!r} (split {split_name!r})", len(rows["chosen_inputs"]),
                MIN_EVAL_PREFERENCE_PAIRS, "preference pair",
                "For a meaningful eval: set data.eval_source (a separate file, read whole) or "
                "evals.<name>.source to a larger set, or use more data in data.source (a "
                "local source without splits holds out every 50th row)")
        return rows

    def _reference_logps(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Log-probs of the starting weights, computed once (on this host's first device)."""
        if self._init_weights is None:
            raise ConfigError("dpo.reference='precomputed' needs the starting weights "
                              "(init_from) or ref_chosen_logps / ref_rejected_logps columns.")
        logging.info("Precomputing reference log-probs for %d pairs.", len(rows["chosen_inputs"]))
        params = jax.tree.map(jnp.asarray, self._init_weights)
        fn = jax.jit(lambda p, b: self._logps(p, b)[:2])
        n, bs = len(rows["chosen_inputs"]), 32
        out_c, out_r = [], []
        for start in range(0, n, bs):
            idx = np.arange(start, start + bs) % n  # pad the last batch by wrapping
            c, r = fn(params, {k: v[idx] for k, v in rows.items() if k.startswith(SIDES)})
            out_c.append(np.asarray(c)[: n - start])
            out_r.append(np.asarray(r)[: n - start])
        return {"ref_chosen_logps": np.concatenate(out_c).astype(np.float32),
                "ref_rejected_logps": np.concatenate(out_r).astype(np.float32)}

    def train_iterator(self, *, seed, batch_size, process_index, process_count):
        from jaxtrain.data import pipeline

        if self.config.data.streaming:  # read and tokenised as consumed
            from jaxtrain.data import streaming_chat

            return streaming_chat.preference_train_iterator(
                self.config.data, self.tokenizer, batch_size=batch_size,
                process_index=process_index, process_count=process_count, seed=self.config.seed,
                reference_logps=self.config.dpo.reference == "precomputed")
        rows = self._train_rows()
        logging.info("DPO train data: %d pairs x %d tokens.", len(rows["chosen_inputs"]),
                     self.config.data.max_length)
        return pipeline.train_iterator(pipeline.ArrayRows(rows), batch_size=batch_size, seed=seed,
                                       process_index=process_index, process_count=process_count)

    def _train_rows(self) -> dict[str, np.ndarray]:
        """The training pairs' rows (:meth:`_rows`), built once."""
        if self._train_arrays is None:
            self._train_arrays = self._rows("train")
        return self._train_arrays

    def num_train_examples(self) -> int | None:
        """Preference pairs per epoch, over all hosts (after ``data.max_documents`` and bad
        rows dropped); None when streaming (the size is not known)."""
        if self.config.data.streaming:
            return None
        return len(self._train_rows()["chosen_inputs"])

    def heldout_batches(self, *, batch_size, process_index, process_count, source=""):
        """The held-out preference pairs (at most `data.eval_rows` of them), or all pairs of
        `source`; streamed (`data.streaming`): only those are read."""
        from jaxtrain.data import pipeline

        d = self.config.data
        if d.streaming:
            from jaxtrain.data import streaming_chat

            rows = streaming_chat.preference_heldout_rows(
                d, self.tokenizer, "validation", source, self.config.seed,
                reference_logps=self.config.dpo.reference == "precomputed")
        else:
            rows = self._rows("validation", source)
            if d.eval_rows:
                rows = {k: v[: d.eval_rows] for k, v in rows.items()}
        return pipeline.eval_batches(pipeline.ArrayRows(rows), batch_size=batch_size,
                                     process_index=process_index, process_count=process_count)

    def heldout_prompts(self, *, source: str = "", max_examples: int = 0,
                        continuation_tokens: int = 32) -> list:
        """(prompt, reference) pairs (:class:`jaxtrain.generate.heldout.HeldoutPrompt`) of the
        held-out preference pairs, or of all of `source`, for the generation evaluator: each
        pair's prompt rendered with the chat template and the assistant header (longer than
        ``data.max_prompt_length`` tokens: its last ones, as in training), and its chosen
        answer as the reference; at most `max_examples` (0 = all). `continuation_tokens` is
        not used: the answer has the rest of ``data.max_length``."""
        from jaxtrain.data import preference
        from jaxtrain.data.sources import split_source, subset_of
        from jaxtrain.generate import heldout

        d = self.config.data
        source, split_name = (source, "all") if source else split_source(d, "validation")
        limit = d.eval_examples if source == preference.BUILTIN_PREFERENCE else \
            (d.max_documents or None)
        examples = preference.load_preference_examples(
            source, split=split_name, n=limit, seed=self.config.seed,
            on_bad_row=d.get("on_bad_row", "error"), subset=subset_of(d, source))
        return heldout.preference_prompts(examples, self.tokenizer,
                                          max_prompt_tokens=d.max_prompt_length,
                                          max_examples=max_examples)

    # ------------------------------------------------------------------ inference

    def inference_inputs(self, batch_size: int,
                         seq_len: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
        """``tokens``: int32 [batch_size, seq_len] (default ``data.max_length``)."""
        return self.family.inference_inputs(self.model_config, batch_size,
                                            seq_len or self.config.data.max_length)

    def inference(self, params, frozen, inputs):
        """The policy's ``logits`` float32 [B, T, V] of plain causal rows (positions 0..T-1);
        the reference is not part of inference."""
        return self.family.inference(self.model_config, params, inputs)


def _split(a: jax.Array, b: jax.Array) -> tuple[jax.Array, ...]:
    """[2B] chosen-then-rejected values of two arrays -> (a_chosen, a_rejected, b_c, b_r)."""
    n = a.shape[0] // 2
    return a[:n], a[n:], b[:n], b[n:]


def _weights_fingerprint(path: str) -> str:
    """Where the precomputed reference came from: the path (a Hub id: its cached snapshot) and
    its newest modification time."""
    from jaxtrain import hub

    path = hub.resolve(path, "init_from")
    newest = 0.0
    for root, _, files in os.walk(path):
        for f in files:
            newest = max(newest, os.path.getmtime(os.path.join(root, f)))
    return f"{os.path.abspath(path)}@{newest}"
