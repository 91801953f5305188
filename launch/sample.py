"""Command line: python -m launch.sample --workdir=DIR --prompt="def " [--num_tokens=100] [--temperature=0.8]

Samples a continuation of the prompt from the latest checkpoint of a language-model run (a task with a
`sample` method, e.g. peri_ln): greedy with --temperature=0, else temperature sampling with --seed.
"""
import sys

from absl import app, flags, logging

from launch import evaluate, runtime

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a language-model run.", required=True)
_PROMPT = flags.DEFINE_string("prompt", "", "Text to continue (token ids, comma separated, for token corpora).")
_NUM_TOKENS = flags.DEFINE_integer("num_tokens", 100, "How many tokens to sample.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 for greedy decoding.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    runtime.setup()
    try:
        config, task, state, step = evaluate.restore_run(_WORKDIR.value)
        if not hasattr(task, "sample"):
            raise ValueError(f"{config.task} has no sample method: --workdir must be a language-model run.")
        text = task.sample(state.params, _PROMPT.value, _NUM_TOKENS.value, _TEMPERATURE.value, _SEED.value)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        logging.exception("stopped")
        sys.exit(f"error: {e}")
    print(f"[step {step}] {_PROMPT.value}{text}")


if __name__ == "__main__":
    app.run(main)
