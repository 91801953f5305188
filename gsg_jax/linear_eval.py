"""Linear probe as a task of the shared training loop (config.task = "gsg_jax.linear_eval"): a linear
classifier trained with labels on the frozen backbone of a pretraining run's latest checkpoint.

The backbone's parameters and batch statistics (a ResNet's; a ViT has none) live in model_state, not in
params, so the optimizer never sees them; the backbone runs in inference mode (batch norm with its running
averages) and its features go through stop_gradient. Evaluators: `linear` (linear_top1 on the test split)
and `knn` (the kNN monitor on the frozen features, which stays at the pretraining run's last value: a
reference)."""
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from gsg_jax import augment, data, evaluate
from gsg_jax.task import build_model


def _latest_checkpoint(workdir: str):
    """(manager, latest step) of a pretraining workdir, read where launch/checkpoint.py writes:
    WORKDIR/checkpoints/STEP/{state, config}. The manager never creates or deletes anything."""
    path = os.path.join(os.path.abspath(workdir), "checkpoints")
    manager = ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(create=False),
                                    item_names=("state", "config"))
    step = manager.latest_step()
    if step is None:  # a bad config value (ValueError: absl's config flag reports it at once, clearly)
        raise ValueError(
            f"No checkpoint in {path}: checkpoint=WORKDIR must be the --workdir of a pretraining run "
            "(python -m launch.main --config=configs/simsiam.py --workdir=WORKDIR).")
    return manager, step


def load_pretraining_config(workdir: str) -> ml_collections.ConfigDict:
    """The config saved with the latest checkpoint of a pretraining workdir."""
    manager, step = _latest_checkpoint(workdir)
    return ml_collections.ConfigDict(manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore())).config)


def load_backbone(workdir: str, abstract_variables, sharding):
    """The backbone's {'params'} and, where it has them (a ResNet; a ViT has none), {'batch_stats'} from the
    latest checkpoint's train state, restored alone (partial restore: no projector, predictor or optimizer
    state) as arrays with `sharding`."""
    manager, step = _latest_checkpoint(workdir)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                            abstract_variables)
    # Where a gsg_jax.task run keeps its backbone in the train state.
    target = {"params": {"backbone": abstract["params"]}}
    if "batch_stats" in abstract:
        target["model_state"] = {"batch_stats": {"backbone": abstract["batch_stats"]}}
    restore = ocp.args.PyTreeRestore(target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                     partial_restore=True)
    state = manager.restore(step, args=ocp.args.Composite(state=restore)).state
    backbone = {"params": state["params"]["backbone"]}
    if "batch_stats" in abstract:
        backbone["batch_stats"] = state["model_state"]["batch_stats"]["backbone"]
    return backbone


class LinearHead(nn.Module):
    """Batch norm without affine parameters, then a linear layer (the probe of MoCo v3 and MAE): the
    normalisation makes one learning rate fit features of any scale, and at inference it is a fixed affine
    map that folds into the linear layer, so the classifier is linear."""
    num_classes: int

    @nn.compact
    def __call__(self, features, train: bool):
        x = nn.BatchNorm(use_running_average=not train, use_scale=False, use_bias=False, momentum=0.9,
                         epsilon=1e-6, name="bn")(features)
        # MoCo's and SimSiam's linear classifier init.
        return nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(0.01), name="fc")(x)


class LinearEvalTask:
    """params: the classifier; model_state: {"backbone": the frozen backbone's variables, "head": the
    classifier's batch statistics}."""

    def __init__(self, config, mesh):
        if config.data.name not in data.DATASETS:
            raise ValueError(f"config.data.name={config.data.name!r} is unknown; choose one of "
                             f"{sorted(data.DATASETS)}.")
        self.config, self.mesh = config, mesh
        self.spec = data.DATASETS[config.data.name]
        pretraining = load_pretraining_config(config.checkpoint)
        pretraining.compute_dtype = config.compute_dtype
        self.backbone = build_model(pretraining).backbone
        size, channels = config.aug.image_size, self.spec.image_shape[-1] if self.spec.image_shape else 3
        self._images = jnp.zeros((1, size, size, channels))
        # Unboxed: the checkpoint holds plain arrays where a ViT's init gives logically partitioned boxes.
        abstract = nn.unbox(jax.eval_shape(functools.partial(self.backbone.init, train=False),
                                           jax.random.key(0), self._images))
        # Restored here, outside the traced init that returns them (as constants of the jitted init, which
        # JAX passes as arguments rather than writing them into the program).
        self._pretrained = load_backbone(config.checkpoint, abstract, NamedSharding(mesh, P()))
        self.head = LinearHead(self.spec.num_classes)

    def _features(self, backbone_variables, x):
        features = self.backbone.apply(backbone_variables, x, train=False)
        return jax.lax.stop_gradient(features.astype(jnp.float32))

    def init(self, rng):
        features = jax.eval_shape(self._features, self._pretrained, self._images)
        head = self.head.init(rng, jnp.zeros(features.shape), train=False)
        return head["params"], {"backbone": self._pretrained, "head": {"batch_stats": head["batch_stats"]}}

    def loss(self, params, model_state, batch, rng):
        host_cropped = "views" in batch   # variable-size images, cropped on the host: [B, 1, S, S, C]
        images, labels = batch["views"][:, 0] if host_cropped else batch["image"], batch["label"]
        keys = jax.random.split(rng, images.shape[0])
        x = augment.augment_batch(images, keys, self.config.aug, crop=not host_cropped)
        logits, head_state = self.head.apply({"params": params, **model_state["head"]},
                                             self._features(model_state["backbone"], x), train=True,
                                             mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, ({**model_state, "head": head_state},
                      {"train_top1": jnp.mean(jnp.argmax(logits, -1) == labels)})

    def train_iterator(self):
        crop = None
        if self.spec.image_shape is None:  # variable-size images: one random resized crop each, on the host
            aug = self.config.aug
            crop = data.HostCrop(aug.image_size, 1, tuple(aug.crop_scale), tuple(aug.crop_ratio))
        return data.train_iterator(self.config.data, self.config.batch_size, self.config.seed, crop)

    @functools.cached_property
    def _predict(self):
        """Jitted eval forward: uint8 images (batch-sharded) -> (L2-normalised features, predicted class),
        replicated on every device so every process holds the whole result."""
        replicated = NamedSharding(self.mesh, P())

        def predict(params, model_state, images):
            x = augment.preprocess_eval(images, self.config.aug)
            features = self._features(model_state["backbone"], x)
            logits = self.head.apply({"params": params, **model_state["head"]}, features, train=False)
            return evaluate.l2_normalize(features), jnp.argmax(logits, -1)

        return jax.jit(predict, out_shardings=(replicated, replicated))

    def _predict_split(self, params, model_state, split):
        source = data.get_source(self.config.data, split)
        center_crop = None if self.spec.image_shape else self.config.aug.image_size
        batches = data.eval_batches(source, self.config.eval_batch_size, center_crop)
        return evaluate.embed_dataset(lambda images: self._predict(params, model_state, images), batches,
                                      self.mesh)

    def linear(self, params, model_state):
        _, predictions, labels = self._predict_split(params, model_state, self.spec.eval_split)
        return {"linear_top1": float(np.mean(predictions == labels))}

    def knn(self, params, model_state):
        return evaluate.knn_evaluation(lambda split: self._predict_split(params, model_state, split),
                                       self.spec, self.config.knn)

    @property
    def evaluators(self):
        return {"linear": self.linear, "knn": self.knn}


def make_task(config, mesh) -> LinearEvalTask:
    return LinearEvalTask(config, mesh)
