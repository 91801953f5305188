"""Autoregressive sampling from a TransformerLM: greedy (temperature 0) or temperature sampling."""
import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.jit, static_argnames=("model", "num_tokens", "temperature"))
def generate(model, params, prompt, rng, num_tokens: int, temperature: float = 0.0):
    """prompt int32 [B, P] -> the next num_tokens tokens, int32 [B, num_tokens].

    Each new token runs the whole fixed-length buffer through the model (no KV cache: simple, and cheap
    for the short contexts sampled here). Causal attention makes the not-yet-written positions, zeros in
    the buffer, invisible to the positions before them."""
    batch, length = prompt.shape
    total = length + num_tokens
    if total > model.max_len:
        raise ValueError(f"prompt ({length}) + num_tokens ({num_tokens}) exceeds the model's max_len "
                         f"({model.max_len}); sample fewer tokens or shorten the prompt.")
    tokens = jnp.zeros((batch, total), jnp.int32).at[:, :length].set(prompt)

    def step(i, carry):
        tokens, rng = carry
        logits = model.apply({"params": params}, tokens)[:, i - 1]
        rng, key = jax.random.split(rng)
        if temperature > 0:
            new = jax.random.categorical(key, logits / temperature)
        else:
            new = jnp.argmax(logits, axis=-1)
        return tokens.at[:, i].set(new.astype(jnp.int32)), rng

    tokens, _ = jax.lax.fori_loop(length, total, step, (tokens, rng))
    return tokens[:, length:]
