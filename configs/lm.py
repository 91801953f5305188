"""Transformer language models whose layer-norm placement is one switch (configs for peri_ln/).

    python -m launch.main --config=configs/lm.py --workdir=workdirs/lm_peri                  # Peri-LN, tiny
    python -m launch.main --config=configs/lm.py:norm=pre --workdir=workdirs/lm_pre
    python -m launch.main --config=configs/lm.py:size=400m,data=tokens:/data/dclm --config.dry_run=True \
        --workdir=/tmp/dry

Args (comma separated): norm (peri default, pre, post, output), size (tiny default, sized for a 2-core CPU;
400m, 1.5b, 3.2b: the paper's scales), data (pydocs default: the Python documentation as bytes from Debian's
python3.11-doc; or tokens:DIR, a pre-tokenised corpus, see peri_ln/data.py).
`--config.dry_run=True` builds the model abstractly and prints the parameter count and the per-device
memory of the train state on the configured mesh, allocating nothing.

The paper's setting for the large sizes: 30B tokens, AdamW (b2 0.95, wd 0.1) with warmup and cosine decay,
peak lr 2e-3 swept around it, context 2048, the cl100k_base vocabulary (100,277 tokens padded to 100,352);
parameters and optimizer state sharded over the fsdp axis, the MLP and heads over the tensor axis.
"""
import ml_collections

from configs import common
from peri_ln import data, model

# Logical axis names of peri_ln/model.py -> mesh axes: FSDP over the embedding dimension of every matrix,
# tensor parallelism over heads, MLP and vocabulary; activations split over the batch axes.
SHARDING_RULES = (
    ("embed", "fsdp"), ("heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor"),
    ("activation_batch", ("data", "fsdp")),
)


def get_config(arg=None):
    arg = common.parse_arg(arg, norm="peri", size="tiny", data="pydocs")
    if arg.norm not in model.PLACEMENTS:
        raise ValueError(f"config arg norm={arg.norm!r} is unknown; choose one of {model.PLACEMENTS}.")
    if arg.size not in model.SIZES:
        raise ValueError(f"config arg size={arg.size!r} is unknown; choose one of {list(model.SIZES)}.")
    tiny = arg.size == "tiny"
    config = common.loop_config()
    config.task = "peri_ln"
    config.seq_len = 128 if tiny else 2048
    config.batch_size = 16 if tiny else 512
    # tiny: 400 steps of 2,048 bytes (0.8M bytes, ~0.08 epochs of the docs; 5-10 min here); large: 30B tokens.
    config.total_steps = 400 if tiny else 30_000_000_000 // (512 * 2048)
    config.log_every_steps = 20 if tiny else 100
    config.eval_every_steps = 200 if tiny else 2000
    config.diag_every_steps = 100 if tiny else 1000
    config.checkpoint_every_steps = 200 if tiny else 2000
    config.evaluators = ("eval_loss", "diagnostics")
    config.eval_batch_size = 16 if tiny else 256
    config.eval_max_batches = 50 if tiny else 100
    config.z_loss = 0.0
    if not tiny:
        config.compute_dtype = "bfloat16"
        config.mesh = dict(data=1, fsdp=-1, tensor=1)
    config.sharding_rules = SHARDING_RULES

    config.data = data.default_data_config()
    if arg.data != "pydocs":
        config.data.source = arg.data
    config.model = ml_collections.ConfigDict(dict(
        size=arg.size,
        norm_placement=arg.norm,
        norm_type="layernorm",        # layernorm | rmsnorm
        embed_norm=ml_collections.config_dict.placeholder(bool),   # None: on for peri only
        final_norm=ml_collections.config_dict.placeholder(bool),   # None: on unless post
        mlp_type="swiglu",            # swiglu | gelu
        qk_norm=False,
        tied_embeddings=True,
        rope_base=10_000.0,
    ))
    config.optimizer.update(dict(
        name="adamw", lr=3e-3 if tiny else 2e-3, lr_batch_scale=0, b1=0.9, b2=0.95, weight_decay=0.1,
        decay_bias_and_norm=False,    # norm gains and biases are not decayed
        warmup_steps=60 if tiny else 2000, final_lr_fraction=0.1, grad_clip_norm=1.0))
    return config
