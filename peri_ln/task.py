"""The language model as a task of the shared training loop (see launch/task.py): next-token cross-entropy
with an optional z-loss, and the per-layer diagnostics of the Peri-LN paper as evaluators.

Evaluators: `eval_loss` (mean next-token loss on the validation split, in nats; the first call also reports
`unigram_entropy`, the loss of a model that knows only the byte frequencies) and `diagnostics` (on one fixed
validation batch: `hidden_var/layer_XX` and `hidden_maxabs/layer_XX` of the residual stream after block XX,
`grad_norm/layer_XX` of the training loss's gradient with respect to block XX's parameters, and the global
`grad_norm`), run every `config.diag_every_steps` and at step 0, before any update.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from peri_ln import data, generate, model as model_lib


def build_model(config, vocab_size: int) -> model_lib.TransformerLM:
    m = config.model
    if m.size not in model_lib.SIZES:
        raise ValueError(f"config.model.size={m.size!r} is unknown; choose one of {list(model_lib.SIZES)}.")
    return model_lib.TransformerLM(
        vocab_size=vocab_size, **model_lib.SIZES[m.size], mlp_type=m.mlp_type, norm_placement=m.norm_placement,
        norm_type=m.norm_type, embed_norm=m.embed_norm, final_norm=m.final_norm, qk_norm=m.qk_norm,
        tied_embeddings=m.tied_embeddings, rope_base=m.rope_base, max_len=config.seq_len,
        dtype=jnp.dtype(config.compute_dtype))


def lm_loss(logits, targets, z_loss: float = 0.0):
    """Mean next-token cross-entropy (nats) plus z_loss * mean(logsumexp(logits)^2) (PaLM), which keeps the
    softmax normaliser near 1. Returns (loss, metrics) with the cross-entropy alone as `ce_loss`."""
    ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))
    loss = ce
    if z_loss:
        loss = loss + z_loss * jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)
    return loss, {"ce_loss": ce}


class LMTask:
    def __init__(self, config, mesh):
        self.config, self.mesh = config, mesh
        self.vocab_size = data.vocab_size(config.data)
        self.model = build_model(config, self.vocab_size)
        self._entropy = None  # computed on first use: the validation stream is only read when evaluating

    def init(self, rng):
        variables = self.model.init(rng, jnp.zeros((1, self.config.seq_len), jnp.int32))
        return variables["params"], {}

    def _apply(self, params, tokens, **kwargs):
        # Activation sharding constraints in the model follow the config's rule table.
        with nn.logical_axis_rules([tuple(r) for r in self.config.sharding_rules]):
            return self.model.apply({"params": params}, tokens, **kwargs)

    def loss(self, params, model_state, batch, rng):
        del rng  # no dropout
        logits = self._apply(params, batch["inputs"])
        loss, metrics = lm_loss(logits, batch["targets"], self.config.z_loss)
        return loss, (model_state, metrics)

    def train_iterator(self):
        return data.train_iterator(self.config.data, self.config.batch_size, self.config.seq_len,
                                   self.config.seed)

    def _eval_batches(self, max_batches):
        batch_sharding = NamedSharding(self.mesh, P(("data", "fsdp")))
        for batch in data.eval_batches(self.config.data, self.config.eval_batch_size, self.config.seq_len,
                                       max_batches):
            yield jax.tree.map(lambda x: jax.make_array_from_process_local_data(batch_sharding, x), batch)

    @functools.cached_property
    def _eval_step(self):
        def ce(params, batch):
            logits = self._apply(params, batch["inputs"])
            return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]))

        return jax.jit(ce, out_shardings=NamedSharding(self.mesh, P()))

    def eval_loss(self, params, model_state):
        losses = [float(self._eval_step(params, batch)) for batch in self._eval_batches(
            self.config.eval_max_batches)]
        results = {"eval_loss": float(np.mean(losses))}
        if self._entropy is None:
            stream = data.load_stream(self.config.data, "validation")
            self._entropy = data.unigram_entropy(stream, self.vocab_size)
            results["unigram_entropy"] = self._entropy
        return results

    @functools.cached_property
    def _diagnose(self):
        num_layers = self.model.num_layers

        def diagnose(params, batch):
            def loss_fn(params):
                logits, hidden = self._apply(params, batch["inputs"], return_hidden=True)
                loss, _ = lm_loss(logits, batch["targets"], self.config.z_loss)
                return loss, hidden

            (_, hidden), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            hidden = hidden.astype(jnp.float32)
            out = {"grad_norm": optax.global_norm(grads)}
            for i in range(num_layers):
                out[f"hidden_var/layer_{i:02d}"] = jnp.var(hidden[i])
                out[f"hidden_maxabs/layer_{i:02d}"] = jnp.max(jnp.abs(hidden[i]))
                out[f"grad_norm/layer_{i:02d}"] = optax.global_norm(grads[f"block_{i:02d}"])
            return out

        return jax.jit(diagnose, out_shardings=NamedSharding(self.mesh, P()))

    def diagnostics(self, params, model_state):
        batch = next(self._eval_batches(1))
        return {k: float(v) for k, v in self._diagnose(params, batch).items()}

    def sample(self, params, prompt: str, num_tokens: int, temperature: float = 0.0, seed: int = 0) -> str:
        """Continues `prompt`: text for the byte-level corpus, else comma-separated token ids (and the
        continuation is returned the same way). The prompt is cut to its last tokens if it is too long."""
        byte_level = self.config.data.source == "pydocs"
        ids = list(prompt.encode()) if byte_level else [int(t) for t in prompt.split(",") if t.strip()]
        num_tokens = min(num_tokens, self.config.seq_len - 1)
        ids = ids[-(self.config.seq_len - num_tokens):] or [data.EOD]
        out = generate.generate(self.model, jax.device_get(params), np.asarray([ids], np.int32),
                                jax.random.key(seed), num_tokens=num_tokens, temperature=temperature)
        out = np.asarray(out[0])
        return bytes(out.astype(np.uint8)).decode(errors="replace") if byte_level else ",".join(map(str, out))

    @property
    def evaluators(self):
        return {"eval_loss": self.eval_loss, "diagnostics": self.diagnostics}

    @property
    def evaluator_every_steps(self):
        return {"diagnostics": self.config.diag_every_steps}


def make_task(config, mesh) -> LMTask:
    return LMTask(config, mesh)
