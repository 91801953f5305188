"""SimSiam with guided stop-gradient as a task of the shared training loop (see launch/task.py)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from gsg_jax import augment, data, evaluate, losses, models


def build_model(config) -> models.SiameseNet:
    m = config.model
    if m.backbone != "resnet18_cifar":
        raise ValueError(f"config.model.backbone={m.backbone!r} is unknown; choose 'resnet18_cifar'.")
    dtype = jnp.dtype(config.compute_dtype)
    return models.SiameseNet(
        backbone=models.resnet18_cifar(width=m.width, dtype=dtype),
        proj_hidden_dim=m.proj_hidden_dim, proj_out_dim=m.proj_out_dim, proj_layers=m.proj_layers,
        pred_hidden_dim=m.pred_hidden_dim, use_predictor=m.predictor, dtype=dtype)


class SiameseTask:
    """Two or four augmented views per example through one encoder; GSG or the symmetric baseline loss."""

    def __init__(self, config, mesh):
        if config.gsg.rule not in losses.ROUTING_RULES:
            raise ValueError(f"config.gsg.rule={config.gsg.rule!r} is unknown; choose one of "
                             f"{losses.ROUTING_RULES}.")
        self.config, self.mesh = config, mesh
        self.spec = data.get_spec(config.data.name)
        self.model = build_model(config)

    def init(self, rng):
        h, w, c = self.spec.image_shape
        variables = self.model.init(rng, jnp.zeros((2, self.config.aug.image_size,
                                                    self.config.aug.image_size, c)), train=False)
        return variables["params"], {"batch_stats": variables["batch_stats"]}

    def _encode(self, params, model_state, views):
        """One encoder pass per view, as in the papers: batch-norm statistics are per view, and over the
        whole global batch (the batch is sharded, jit computes the mean across devices)."""
        outputs = []
        for x in views:
            out, model_state = self.model.apply({"params": params, **model_state}, x, train=True,
                                                mutable=["batch_stats"])
            outputs.append(out)
        return outputs, model_state

    def loss(self, params, model_state, batch, rng):
        images = batch["image"]
        batch_size = images.shape[0]
        aug_key, partner_key, route_key = jax.random.split(rng, 3)
        view_keys = jax.random.split(aug_key, (4, batch_size))   # an independent key per example and view
        views = functools.partial(augment.augment_batch, cfg=self.config.aug)
        metrics = {}
        if self.config.gsg.enabled:
            partner = losses.partner_permutation(partner_key, batch_size, self.config.gsg.partner)
            partner_images = images[partner]                        # the partner may live on another device
            (o11, o12, o21, o22), model_state = self._encode(params, model_state, [
                views(images, view_keys[0]), views(images, view_keys[1]),
                views(partner_images, view_keys[2]), views(partner_images, view_keys[3])])
            loss, aux = losses.gsg_loss(o11["p"], o12["p"], o21["p"], o22["p"],
                                        o11["z"], o12["z"], o21["z"], o22["z"],
                                        rule=self.config.gsg.rule, key=route_key)
            for i in range(4):
                metrics[f"choice_frac/{i}"] = jnp.mean(aux["choice"] == i)
            metrics["self_pair_rate"] = jnp.mean(partner == jnp.arange(batch_size))
        else:
            (o1, o2), model_state = self._encode(params, model_state, [
                views(images, view_keys[0]), views(images, view_keys[1])])
            loss, aux = losses.simsiam_loss(o1["p"], o2["p"], o1["z"], o2["z"])
        metrics["train_z_std"] = evaluate.z_std(jax.lax.stop_gradient(o11["z"] if self.config.gsg.enabled
                                                                         else o1["z"]))
        return loss, (model_state, metrics)

    def train_iterator(self):
        return data.train_iterator(self.config.data, self.config.batch_size, self.config.seed)

    @functools.cached_property
    def _embed(self):
        """Jitted eval-mode forward: uint8 images (batch-sharded) -> (normalised features, z), replicated
        on every device so every process holds the whole result."""
        replicated = NamedSharding(self.mesh, P())

        def embed(params, model_state, images):
            x = augment.preprocess_eval(images, self.config.aug)
            out = self.model.apply({"params": params, **model_state}, x, train=False)
            return evaluate.l2_normalize(out["features"]), out["z"]

        return jax.jit(embed, out_shardings=(replicated, replicated))

    def _embed_split(self, params, model_state, split):
        source = data.get_source(self.config.data, split)
        return evaluate.embed_dataset(
            lambda images: self._embed(params, model_state, images),
            data.eval_batches(source, self.config.eval_batch_size), self.mesh)

    def knn(self, params, model_state):
        bank, _, bank_labels = self._embed_split(params, model_state, self.spec.train_split)
        queries, _, labels = self._embed_split(params, model_state, self.spec.eval_split)
        top1 = evaluate.knn_top1(bank, bank_labels, queries, labels, self.spec.num_classes,
                                 k=self.config.knn.k, temperature=self.config.knn.temperature)
        return {"knn_top1": top1}

    def z_std_eval(self, params, model_state):
        _, z, _ = self._embed_split(params, model_state, self.spec.eval_split)
        return {"z_std": float(evaluate.z_std(jnp.asarray(z)))}

    @property
    def evaluators(self):
        return {"knn": self.knn, "z_std": self.z_std_eval}


def make_task(config, mesh) -> SiameseTask:
    return SiameseTask(config, mesh)
