"""Causal language modelling: pretraining, chat SFT, mixture of experts, distillation.

One task, chosen by config:
* ``data.kind='text'``: documents -> tokens -> rows of ``data.seq_len`` (``data.mode``:
  ``concat`` cuts one stream, ``pack`` bins whole documents); attention stays inside each
  document through the rows' segment ids.
* ``data.kind='chat'``: conversations -> the tokenizer's chat template (ChatML when it has
  none) -> loss on assistant tokens only (``data.packing`` optional).
* ``model.name``: the causal LM family (:mod:`jaxtrain.models.registry`; ``llama`` covers
  Llama, Qwen2, Mistral).
* ``model.num_experts > 0``: MoE layers; the model returns its router statistics and the
  router losses (:func:`jaxtrain.losses.router.router_losses`) join the loss with their
  coefficients (``loss.load_balance``, ``loss.balance_deviation``, ``loss.router_z``).
* ``distill.teacher``: a frozen teacher (a jaxtrain workdir or a Hugging Face directory);
  loss = ``alpha · T² KL + (1 − alpha) · CE``.
* ``init_from``: start from a Hugging Face directory or a jaxtrain workdir's weights.
* ``data.curriculum``: ``"64:200,128:400"`` trains on 64-token rows until step 200, then 128
  until 400, then ``data.seq_len``; tokens per batch stay constant (each row is cut into
  ``seq_len / length`` rows), and one step is compiled per length.

Batches are dicts of [rows, length] arrays: inputs, targets, loss_mask, segment_ids, positions.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from ml_collections import config_dict

from jaxtrain.config import ConfigError, base_config
from jaxtrain.data.sanity import MIN_EVAL_LM_ROWS, check_eval_rows, on_bad_row_rule
from jaxtrain.evaluators import eval_config
from jaxtrain.losses.lm import distillation_loss, next_token_loss, token_cross_entropy
from jaxtrain.losses.router import router_losses
from jaxtrain.models.registry import CAUSAL_LM, get_model, model_schema
from jaxtrain.task import Task
from jaxtrain.weights import load_pretrained, starting_model

ROW_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


def parse_curriculum(spec: str, seq_len: int) -> list[tuple[int, int]]:
    """``"64:200,128:400"`` -> [(64, 200), (128, 400)]: (length, until step), lengths dividing
    ``seq_len``, both increasing."""
    stages = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        try:
            length, until = (int(v) for v in part.split(":"))
        except ValueError:
            raise ConfigError(
                f"data.curriculum {spec!r}: stage {part!r} is not 'length:until_step' "
                "(e.g. '64:200,128:400')."
            ) from None
        if length <= 0 or seq_len % length or length >= seq_len:
            raise ConfigError(
                f"data.curriculum {spec!r}: length {length} must be < data.seq_len ({seq_len}) "
                "and divide it."
            )
        if stages and (length <= stages[-1][0] or until <= stages[-1][1]):
            raise ConfigError(f"data.curriculum {spec!r}: lengths and steps must increase.")
        stages.append((length, until))
    return stages


def curriculum_transform(stages: list[tuple[int, int]]):
    """The pipeline's per-batch transform: batch `step` cut into rows of the stage's length."""

    def transform(step: int, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for length, until in stages:
            if step < until:
                return {k: v.reshape(-1, length) for k, v in batch.items()}
        return batch

    return transform


class LMTask(Task):
    name = "lm"
    activation_sharding = True

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        c = base_config()
        c.task = cls.name
        model = get_model("llama").default_config()  # model.name: any causal LM family
        model["attention_impl"] = config_dict.placeholder(str)
        c.model = ml_collections.ConfigDict(model)
        c.init_from = ""  # a Hugging Face model directory or a jaxtrain workdir
        c.data = ml_collections.ConfigDict(dict(
            kind="text",  # 'text' (pretraining) | 'chat' (SFT) | 'synthetic' (random tokens)
            source="shakespeare",  # built-in | local json/jsonl/parquet/arrow/txt | hub name
            eval_source="",  # a separate eval set (all of it); default: the validation split
            split="train",  # the training split spec: 'train_sft', 'train[:10%]', 'a+b'
            eval_split="",  # the held-out split spec; '' = 'validation' (undivided: every 50th)
            subset="",  # the dataset config name, e.g. C4's 'en' (hub / local)
            streaming=False,  # text, chat: read and tokenise the source as training consumes it
            text_field="text",  # text: the documents' column
            text_fields="",  # chat: comma-separated fields joined into one exchange
            tokenizer="gpt2",  # built-in GPT-2 BPE, or a local / hub tokenizer
            seq_len=128,
            mode="concat",  # text: 'concat' | 'pack'
            packing=False,  # chat: pack several conversations per row
            max_documents=0,  # use at most this many documents / conversations (0 = all)
            train_examples=4000,  # sizes of the generated sets ('builtin' chat, 'synthetic')
            eval_examples=200,
            eval_rows=256,  # evaluate on at most this many rows (0 = all)
            curriculum="",  # e.g. '32:100,64:200'
            cache_dir="",  # tokenized rows cache (default ~/.cache/jaxtrain/rows)
            token_store="",  # text: '' = token store under the cache dir | DIR | 'memory'
            tokenize_workers=0,  # text: processes that build a token store (0 = in process)
            on_bad_row="error",  # a bad row: 'error' (names file and row) | 'skip' (dropped)
        ))
        c.loss = ml_collections.ConfigDict(dict(
            z_loss=0.0, load_balance=0.01, balance_deviation=0.0, router_z=0.001))
        c.distill = ml_collections.ConfigDict(dict(teacher="", alpha=0.5, temperature=2.0))
        c.eval.batch_size = 64
        c.evals.val = eval_config("perplexity")  # metrics eval/val/loss, eval/val/perplexity
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
            ("data.kind", lambda v: v in ("text", "chat", "synthetic"),
             "must be 'text', 'chat' or 'synthetic'"),
            ("data.mode", lambda v: v in ("concat", "pack"), "must be 'concat' or 'pack'"),
            ("data.seq_len", lambda v: v > 0, "must be > 0"),
            ("data.eval_rows", lambda v: v >= 0, "must be >= 0 (0 = all)"),
            on_bad_row_rule(),
            ("distill.alpha", lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]"),
            ("distill.temperature", lambda v: v > 0, "must be > 0"),
            ("loss.z_loss", lambda v: v >= 0, "must be >= 0"),
        ]

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        self.family = get_model(config.model.name, kind=CAUSAL_LM)
        self.model_config, self._init_weights, _ = starting_model(
            self.family, config.model.to_dict(), config.init_from)
        self.model = self.family.module(self.model_config)
        self.stages = parse_curriculum(config.data.curriculum, config.data.seq_len)
        self.teacher_config = None
        self._teacher_weights = None
        if config.distill.teacher:
            t_cfg, self._teacher_weights, _ = load_pretrained(
                config.distill.teacher, self.family, "distill.teacher")
            # run like the student, but route as trained (capacity and the MoE implementation
            # decide what MoE computes)
            runtime = {k: getattr(self.model_config, k) for k in self.family.runtime_fields
                       if k not in ("capacity_factor", "moe_impl")}
            self.teacher_config = dataclasses.replace(t_cfg, **runtime)
            if self.teacher_config.vocab_size != self.model_config.vocab_size:
                raise ConfigError(
                    f"distill.teacher {config.distill.teacher!r} has vocab_size "
                    f"{self.teacher_config.vocab_size}, the student {self.model_config.vocab_size}"
                    ": distillation compares logits token by token, so they must match "
                    "(set model.vocab_size)."
                )
            self.teacher = self.family.module(self.teacher_config)
        self._tokenizer = None
        self._train_row_source = None  # the training rows, once built (_train_rows)

    # ------------------------------------------------------------------ model

    def init_params(self, rng: jax.Array) -> Any:
        return self.family.init(self.model_config, rng)

    def init_frozen(self, rng: jax.Array) -> Any:
        if self.teacher_config is None:
            return {}
        return {"teacher": self.family.init(self.teacher_config, rng)}

    def pretrained(self) -> dict[str, Any]:
        weights = {}
        if self._init_weights is not None:
            weights["params"] = self._init_weights
        if self._teacher_weights is not None:
            weights["frozen"] = {"teacher": self._teacher_weights}
        return weights

    def _apply(self, model: nn.Module, params, batch):
        # Synthetic rows are one document each: plain causal attention, no mask array (the
        # fast cuDNN path on GPU).
        segments = None if self.config.data.kind == "synthetic" else batch["segment_ids"]
        return model.apply({"params": params}, batch["inputs"], batch["positions"], segments)

    def loss_fn(self, params, batch, rng, frozen):
        c = self.config
        logits, aux = self._apply(self.model, params, batch)
        targets, mask = batch["targets"], batch["loss_mask"]
        if self.teacher_config is not None:
            teacher_logits, _ = self._apply(self.teacher, frozen["teacher"], batch)
            loss, metrics = distillation_loss(
                logits, teacher_logits, targets, mask,
                alpha=c.distill.alpha, temperature=c.distill.temperature)
        else:
            loss, metrics = next_token_loss(logits, targets, mask, c.loss.z_loss)
            if not c.loss.z_loss:
                metrics.pop("z_loss")
        metrics["perplexity"] = jnp.exp(metrics["ce"])
        if "router_logits" in aux:  # MoE layers: the router losses join with their coefficients
            router = router_losses(aux["router_logits"], aux["expert_index"])
            for name in ("load_balance", "balance_deviation", "router_z"):
                coef = c.loss[name]
                if coef:
                    loss = loss + coef * router[name]
                metrics[f"moe/{name}"] = router[name]
            metrics["moe/expert_load"] = router["expert_load"]
            metrics["moe/dropped_fraction"] = jnp.mean(aux["dropped_fraction"])
        return loss, metrics

    def step_tokens(self, batch) -> int:
        return int(np.prod(batch["inputs"].shape))

    def model_flops_per_step(self, batch) -> float:
        """``tokens · flops_per_token(length)`` (the model family's formula, e.g.
        LlamaConfig.flops_per_token), plus the teacher's forward pass (a third of its training
        FLOPs) when distilling; 0 (XLA's count) for a family without a formula."""
        per_token = self.family.flops_per_token
        if per_token is None:
            return 0.0
        rows, length = batch["inputs"].shape
        flops = rows * length * per_token(self.model_config, length)
        if self.teacher_config is not None:
            flops += rows * length * per_token(self.teacher_config, length) / 3
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
        d = self.config.data
        if d.kind == "synthetic":
            return _synthetic_rows(d.train_examples if split == "train" else d.eval_examples,
                                   d.seq_len, self.model_config.vocab_size,
                                   seed=self.config.seed + (split != "train"))
        from jaxtrain.data import text
        from jaxtrain.data.sources import split_source, subset_of

        source, split_name = (source, "all") if source else split_source(d, split)
        subset = subset_of(d, source)
        tok = self.tokenizer
        limit = d.max_documents or None
        if d.kind == "text":
            docs = text.load_documents(source, split=split_name, text_field=d.text_field,
                                       max_documents=limit, subset=subset,
                                       on_bad_row=d.get("on_bad_row", "error"))
            build = lambda: text.pretrain_rows(docs, tok, seq_len=d.seq_len, mode=d.mode)  # noqa: E731
            key = text.rows_cache_key(source=source, split=split, tokenizer_name=d.tokenizer,
                                      tokenizer=tok, seq_len=d.seq_len, mode=d.mode,
                                      documents=docs)
        else:
            from jaxtrain.data import chat

            if source == chat.BUILTIN_CHAT:
                limit = d.train_examples if split == "train" else d.eval_examples
            fields = [f.strip() for f in d.text_fields.split(",") if f.strip()] or None
            examples = chat.load_chat_examples(source, split=split_name, n=limit,
                                               seed=self.config.seed, text_fields=fields,
                                               on_bad_row=d.get("on_bad_row", "error"),
                                               subset=subset)
            build = lambda: chat.sft_rows(examples, tok, seq_len=d.seq_len,  # noqa: E731
                                          packing=d.packing, text_fields=fields)
            key = text.rows_cache_key(
                source=source, split=split, tokenizer_name=d.tokenizer, tokenizer=tok,
                seq_len=d.seq_len, mode="chat-packed" if d.packing else "chat",
                documents=[json.dumps(e, sort_keys=True, default=str) for e in examples],
                text_fields=fields)
        rows = text.cached_rows(key, build, d.cache_dir or None)
        if not len(rows["inputs"]):
            raise ConfigError(f"data.source {source!r} ({split}) gave no rows of "
                              f"{d.seq_len} tokens: use more data or a shorter data.seq_len.")
        if split != "train":
            check_eval_rows(
                f"{source!r} (split {split_name!r})", len(rows["inputs"]), MIN_EVAL_LM_ROWS,
                "token row",
                "For a meaningful eval: set data.eval_source (a separate file, read whole) or "
                "evals.<name>.source to a larger set, or use more data in data.source (a "
                "local source without splits holds out every 50th row)")
        return rows

    def train_iterator(self, *, seed, batch_size, process_index, process_count):
        from jaxtrain.data import pipeline

        if self.config.data.get("streaming", False):  # tokenised and packed as consumed
            from jaxtrain.data import streaming, streaming_chat

            transform = curriculum_transform(self.stages) if self.stages else None
            if self.config.data.kind == "chat":
                return streaming_chat.chat_train_iterator(
                    self.config.data, self.tokenizer, batch_size=batch_size,
                    process_index=process_index, process_count=process_count,
                    seed=self.config.seed, transform=transform)
            return streaming.text_train_iterator(
                self.config.data, self.tokenizer, batch_size=batch_size,
                process_index=process_index, process_count=process_count, transform=transform)
        rows = self._train_rows()
        logging.info("LM train data: %d rows x %d tokens (%d loss tokens).", len(rows),
                     self.config.data.seq_len, rows.num_loss_tokens)
        return pipeline.train_iterator(
            rows, batch_size=batch_size, seed=seed, process_index=process_index,
            process_count=process_count,
            transform=curriculum_transform(self.stages) if self.stages else None,
        )

    def _train_rows(self):
        """The training rows (:meth:`_row_source`), built or opened once."""
        if self._train_row_source is None:
            self._train_row_source = self._row_source("train")
        return self._train_row_source

    def num_train_examples(self) -> int | None:
        """Training rows per epoch, over all hosts: rows of ``data.seq_len`` tokens after
        concatenation or packing (``data.train_examples`` for synthetic data); None when
        streaming (the size is not known)."""
        d = self.config.data
        if d.get("streaming", False):
            return None
        if d.kind == "synthetic":
            return d.train_examples
        return len(self._train_rows())

    def heldout_batches(self, *, batch_size, process_index, process_count, source=""):
        """The held-out rows (at most `data.eval_rows` of them), or all rows of `source`."""
        from jaxtrain.data import pipeline

        rows = self._row_source("validation", source)
        if self.config.data.eval_rows:
            rows = rows.head(self.config.data.eval_rows)
        return pipeline.eval_batches(rows, batch_size=batch_size,
                                     process_index=process_index, process_count=process_count)

    def _row_source(self, split: str, source: str = ""):
        """Random-access rows of `split` (``len``, ``[i]``, ``head(n)``, ``num_loss_tokens``):
        text read lazily from a token store (``data.token_store``,
        :mod:`jaxtrain.data.token_store`; the same rows as in memory), else built in memory."""
        from jaxtrain.data.text import TokenRows

        d = self.config.data
        if d.get("streaming", False):
            from jaxtrain.data import streaming, streaming_chat

            if d.kind == "chat":
                return TokenRows(streaming_chat.chat_heldout_rows(d, self.tokenizer, split,
                                                                  source, self.config.seed))
            return TokenRows(streaming.text_heldout_rows(d, self.tokenizer, split, source))
        if d.kind != "text" or d.get("token_store", "") == "memory":
            return TokenRows(self._rows(split, source))
        from jaxtrain.data import token_store
        from jaxtrain.data.sources import split_source

        store = token_store.open_store(d, self.tokenizer, split, source)
        rows = token_store.store_rows(store, d.seq_len, d.mode)
        if split != "train":
            name, split_name = (source, "all") if source else split_source(d, split)
            check_eval_rows(
                f"{name!r} (split {split_name!r})", len(rows), MIN_EVAL_LM_ROWS, "token row",
                "For a meaningful eval: set data.eval_source (a separate file, read whole) or "
                "evals.<name>.source to a larger set, or use more data in data.source (a "
                "local source without splits holds out every 50th row)")
        return rows

    def token_nll(self, params, batch):
        """Per row: summed next-token NLL over the loss-masked tokens (``nll``) and their
        count (``tokens``), for the perplexity evaluator."""
        logits, _ = self._apply(self.model, params, batch)
        nll, _ = token_cross_entropy(logits, batch["targets"])
        mask = batch["loss_mask"].astype(jnp.float32)
        return {"nll": jnp.sum(nll * mask, axis=-1), "tokens": jnp.sum(mask, axis=-1)}

    def heldout_prompts(self, *, source: str = "", max_examples: int = 0,
                        continuation_tokens: int = 32) -> list:
        """(prompt, reference) pairs (:class:`jaxtrain.generate.heldout.HeldoutPrompt`) of the
        held-out split, or of all of `source`, for the generation evaluator; at most
        `max_examples` (0 = all).

        * chat: each conversation before its last assistant turn, rendered with the chat
          template SFT uses and the assistant header; the reference is that turn's content.
          A prompt of more than ``data.seq_len − continuation_tokens`` tokens is left out.
        * text: windows of the held-out documents' tokens: the first ``data.seq_len // 2``
          are the prompt, the next `continuation_tokens` (at most the rest of
          ``data.seq_len``), decoded, its reference.
        """
        from jaxtrain.data import chat, text
        from jaxtrain.data.sources import split_source, subset_of
        from jaxtrain.generate import heldout

        d = self.config.data
        if d.kind == "synthetic":
            raise ConfigError("data.kind='synthetic' (random tokens) has no text to compare "
                              "generations with: use the generation evaluator with text or "
                              "chat data, or remove it.")
        source, split_name = (source, "all") if source else split_source(d, "validation")
        on_bad_row = d.get("on_bad_row", "error")
        subset = subset_of(d, source)
        if d.kind == "text":
            docs = text.load_documents(source, split=split_name, text_field=d.text_field,
                                       max_documents=d.max_documents or None,
                                       on_bad_row=on_bad_row, subset=subset)
            prompt = max(1, d.seq_len // 2)
            return heldout.text_prompts(
                docs, self.tokenizer, prompt_tokens=prompt, max_examples=max_examples,
                continuation_tokens=max(1, min(continuation_tokens, d.seq_len - prompt)))
        limit = d.eval_examples if source == chat.BUILTIN_CHAT else (d.max_documents or None)
        fields = [f.strip() for f in d.text_fields.split(",") if f.strip()] or None
        examples = chat.load_chat_examples(source, split=split_name, n=limit,
                                           seed=self.config.seed, text_fields=fields,
                                           on_bad_row=on_bad_row, subset=subset)
        return heldout.chat_prompts(examples, self.tokenizer, text_fields=fields,
                                    max_prompt_tokens=max(1, d.seq_len - continuation_tokens),
                                    max_examples=max_examples)

    # ------------------------------------------------------------------ inference

    def inference_inputs(self, batch_size: int,
                         seq_len: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
        """``tokens``: int32 [batch_size, seq_len] (default ``data.seq_len``)."""
        return self.family.inference_inputs(self.model_config, batch_size,
                                            seq_len or self.config.data.seq_len)

    def inference(self, params, frozen, inputs):
        """``logits`` float32 [B, T, V] of plain causal rows (positions 0..T-1, one document
        per row; a teacher in ``frozen`` is not used)."""
        return self.family.inference(self.model_config, params, inputs)


def _synthetic_rows(n: int, seq_len: int, vocab: int, seed: int) -> dict[str, np.ndarray]:
    """Uniform random tokens (benchmarks): one document per row, every target counted."""
    tokens = np.random.default_rng(seed).integers(0, vocab, (n, seq_len + 1), dtype=np.int32)
    return {
        "inputs": tokens[:, :-1], "targets": tokens[:, 1:],
        "loss_mask": np.ones((n, seq_len), np.float32),
        "segment_ids": np.ones((n, seq_len), np.int32),
        "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (n, seq_len)).copy(),
    }

