"""SimSiam with guided stop-gradient as a task of the shared training loop (see launch/task.py)."""
import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from gsg_jax import augment, data, evaluate, losses, models


def build_model(config) -> models.SiameseNet:
    m = config.model
    if m.backbone != "resnet_cifar":
        raise ValueError(f"config.model.backbone={m.backbone!r} is unknown; choose 'resnet_cifar'.")
    dtype = jnp.dtype(config.compute_dtype)
    return models.SiameseNet(
        backbone=models.resnet_cifar(depth=m.depth, width=m.width, dtype=dtype),
        proj_hidden_dim=m.proj_hidden_dim, proj_out_dim=m.proj_out_dim, proj_layers=m.proj_layers,
        pred_hidden_dim=m.pred_hidden_dim, use_predictor=m.predictor, dtype=dtype)


class SiameseTask:
    """Two or four augmented views per example through one encoder; GSG or the symmetric baseline loss."""

    def __init__(self, config, mesh):
        if config.gsg.rule not in losses.ROUTING_RULES:
            raise ValueError(f"config.gsg.rule={config.gsg.rule!r} is unknown; choose one of "
                             f"{losses.ROUTING_RULES}.")
        self.config, self.mesh = config, mesh
        if config.data.name not in data.DATASETS:
            raise ValueError(f"config.data.name={config.data.name!r} is unknown; choose one of "
                             f"{sorted(data.DATASETS)}.")
        self.spec = data.DATASETS[config.data.name]
        self.model = build_model(config)

    def init(self, rng):
        h, w, c = self.spec.image_shape
        variables = self.model.init(rng, jnp.zeros((2, self.config.aug.image_size,
                                                    self.config.aug.image_size, c)), train=False)
        return variables["params"], {"batch_stats": variables["batch_stats"]}

    def _encode(self, params, model_state, views):
        """Encoder passes over views [V, B, H, W, C], one view after the other as in the papers: batch norm
        normalises each view's batch separately and updates its running averages once per view. Each view's
        batch is the global batch: under jit over the sharded batch the batch-norm mean is taken across
        devices (synchronised BN). (A scan over views compiles faster but runs ~15x slower on XLA:CPU, and
        a vmap 2x slower: both measured.)"""
        outputs = []
        for x in views:
            out, model_state = self.model.apply({"params": params, **model_state}, x, train=True,
                                                mutable=["batch_stats"])
            outputs.append(out)
        return jax.tree.map(lambda *xs: jnp.stack(xs), *outputs), model_state

    def loss(self, params, model_state, batch, rng):
        images = batch["image"]
        batch_size = images.shape[0]
        aug_key, partner_key, route_key = jax.random.split(rng, 3)
        view_keys = jax.random.split(aug_key, (4, batch_size))   # an independent key per example and view
        # [V, B, ...] images and keys -> [V, B, ...] augmented views, one vmapped augmentation for all.
        views = jax.vmap(functools.partial(augment.augment_batch, cfg=self.config.aug))
        metrics = {}
        if self.config.gsg.enabled:
            partner = losses.partner_permutation(partner_key, batch_size, self.config.gsg.partner)
            partner_images = images[partner]                        # the partner may live on another device
            sources = jnp.stack([images, images, partner_images, partner_images])  # 11, 12, 21, 22
            out, model_state = self._encode(params, model_state, views(sources, view_keys))
            p, z = out["p"], out["z"]
            loss, aux = losses.gsg_loss(*p, *z, rule=self.config.gsg.rule, key=route_key)
            for i in range(4):
                metrics[f"choice_frac/{i}"] = jnp.mean(aux["choice"] == i)
            metrics["self_pair_rate"] = jnp.mean(partner == jnp.arange(batch_size))
        else:
            out, model_state = self._encode(params, model_state,
                                            views(jnp.stack([images, images]), view_keys[:2]))
            p, z = out["p"], out["z"]
            loss, aux = losses.simsiam_loss(*p, *z)
        metrics["train_z_std"] = evaluate.z_std(jax.lax.stop_gradient(z[0]))
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
