"""SimSiam with guided stop-gradient as a task of the shared training loop (see launch/task.py)."""
import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from gsg_jax import augment, data, evaluate, losses, models
from peri_ln import model as vit_model


def _resnet(make):
    return lambda m, dtype: make(depth=m.depth, width=m.width, dtype=dtype,
                                 zero_init_residual=m.zero_init_residual)


def _vit(m, dtype):
    return vit_model.vit(depth=m.depth, width=m.width, dtype=dtype, patch_size=m.patch_size,
                         num_heads=m.num_heads, norm_placement=m.norm_placement, norm_type=m.norm_type)


# config.model.backbone -> (config.model, compute dtype) -> backbone. Each reads only its own keys: a ResNet's
# width is a float multiplier and it has zero_init_residual; a ViT's width is its d_model.
BACKBONES = {"resnet_cifar": _resnet(models.resnet_cifar), "resnet_imagenet": _resnet(models.resnet_imagenet),
             "vit": _vit}


def build_model(config) -> models.SiameseNet:
    m = config.model
    if m.backbone not in BACKBONES:
        raise ValueError(f"config.model.backbone={m.backbone!r} is unknown; choose one of {sorted(BACKBONES)}.")
    dtype = jnp.dtype(config.compute_dtype)
    return models.SiameseNet(
        backbone=BACKBONES[m.backbone](m, dtype),
        proj_hidden_dim=m.proj_hidden_dim, proj_out_dim=m.proj_out_dim, proj_layers=m.proj_layers,
        pred_hidden_dim=m.pred_hidden_dim, use_predictor=m.predictor, dtype=dtype)


CROP_MODES = ("four_crop", "two_crop")
METHODS = ("simsiam", "byol")


def ema_decay(byol_config, num_updates, total_updates):
    """BYOL's target decay: tau_k = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2, or tau_base throughout."""
    if byol_config.tau_schedule == "constant":
        return jnp.asarray(byol_config.tau_base, jnp.float32)
    if byol_config.tau_schedule != "cosine":
        raise ValueError(f"config.byol.tau_schedule={byol_config.tau_schedule!r} is unknown; choose 'cosine' "
                         "or 'constant'.")
    progress = jnp.minimum(num_updates / total_updates, 1.0)
    return 1.0 - (1.0 - byol_config.tau_base) * (jnp.cos(jnp.pi * progress) + 1.0) / 2.0


class SiameseTask:
    """SimSiam or BYOL, with GSG or the symmetric baseline loss. Per step an image gets two augmented views;
    with GSG its partner's two views come either from two new crops of the partner (`four_crop`, the paper:
    four encoder passes) or from the partner's own two views (`two_crop`: two passes). BYOL's targets come
    from an EMA copy of the encoder (backbone + projector), kept in model_state["target"] and updated by
    `after_update`, so no gradient reaches it."""

    def __init__(self, config, mesh):
        for key, value, allowed in (("gsg.rule", config.gsg.rule, losses.ROUTING_RULES),
                                    ("gsg.partner", config.gsg.partner, losses.PARTNER_MODES),
                                    ("gsg.crops", config.gsg.crops, CROP_MODES),
                                    ("method", config.method, METHODS),
                                    ("data.name", config.data.name, sorted(data.DATASETS))):
            if value not in allowed:
                raise ValueError(f"config.{key}={value!r} is unknown; choose one of {tuple(allowed)}.")
        self.config, self.mesh = config, mesh
        self.spec = data.DATASETS[config.data.name]
        self.model = build_model(config)

    @property
    def byol(self) -> bool:
        return self.config.method == "byol"

    def init(self, rng):
        c = self.spec.image_shape[-1] if self.spec.image_shape else 3  # variable-size images are RGB
        size = self.config.aug.image_size
        variables = self.model.init(rng, jnp.zeros((2, size, size, c)), train=False)
        model_state = {"batch_stats": variables["batch_stats"]}
        if self.byol:  # the target starts as a copy of the online encoder (no predictor)
            model_state["target"] = jax.tree.map(
                jnp.copy, {kind: {k: v for k, v in variables[kind].items() if k != "predictor"}
                           for kind in ("params", "batch_stats")})
        return variables["params"], model_state

    def after_update(self, params, model_state, num_updates):
        """BYOL: target <- tau target + (1 - tau) online, after each optimizer update."""
        if not self.byol:
            return model_state
        tau = ema_decay(self.config.byol, num_updates, self.config.total_steps)
        target = model_state["target"]
        new_params = jax.tree.map(lambda t, o: tau * t + (1.0 - tau) * o, target["params"],
                                  {k: params[k] for k in target["params"]})
        return {**model_state, "target": {**target, "params": new_params}}

    def _encode(self, variables, views, method=None):
        """Encoder passes over views [V, B, H, W, C], one view after the other as in the papers: batch norm
        normalises each view's batch separately and updates its running averages once per view. Each view's
        batch is the global batch: under jit over the sharded batch the batch-norm mean is taken across
        devices (synchronised BN). (A scan over views compiles faster but runs ~15x slower on XLA:CPU, and
        a vmap 2x slower: both measured.)"""
        params, model_state = variables
        outputs = []
        for x in views:
            out, model_state = self.model.apply({"params": params, **model_state}, x, train=True,
                                                method=method, mutable=["batch_stats"])
            outputs.append(out)
        return jax.tree.map(lambda *xs: jnp.stack(xs), *outputs), model_state

    def _augment(self, views, keys, crop):
        """views [V, B, ...] uint8, alternating an image's first and second view -> float [V, B, S, S, C];
        first and second views may differ in blur and solarize probability (BYOL's asymmetric set)."""
        first, second = (jax.vmap(functools.partial(augment.augment_batch, cfg=self.config.aug, view=v,
                                                    crop=crop))(views[v::2], keys[v::2]) for v in (0, 1))
        return jnp.stack([first, second], axis=1).reshape(len(views), *first.shape[1:])

    def _views(self, batch, batch_size, key, partner):
        """Augmented views [V, B, S, S, C]: (11, 12) for the baseline and two_crop, (11, 12, 21, 22) for
        four_crop, where 21, 22 are new views of each example's partner."""
        num_views = self._num_views
        keys = jax.random.split(key, (num_views, batch_size))  # an independent key per example and view
        if "views" in batch:  # cropped on the host (variable-size images): [B, crops, S, S, C]
            views = jnp.moveaxis(batch["views"][:, :num_views], 1, 0)
            if num_views == 4:  # crops 2 and 3 of an example are its views as someone's partner
                views = views.at[2:].set(views[2:, partner])
            return self._augment(views, keys, crop=False)
        images = batch["image"]
        sources = [images, images] if num_views == 2 else [images, images, images[partner], images[partner]]
        return self._augment(jnp.stack(sources), keys, crop=True)

    def loss(self, params, model_state, batch, rng):
        gsg = self.config.gsg
        aug_key, partner_key, route_key = jax.random.split(rng, 3)
        batch_size = (batch["views"] if "views" in batch else batch["image"]).shape[0]
        partner = losses.partner_permutation(partner_key, batch_size, gsg.partner) if gsg.enabled else None
        views = self._views(batch, batch_size, aug_key, partner)
        out, batch_stats = self._encode((params, {"batch_stats": model_state["batch_stats"]}), views)
        p, z = out["p"], out["z"]
        new_state = {**model_state, **batch_stats}
        if self.byol:
            target = model_state["target"]
            (_, t), target_stats = self._encode((target["params"], {"batch_stats": target["batch_stats"]}),
                                                views, method=models.SiameseNet.encode)
            new_state["target"] = {**target, **target_stats}
        else:
            t = z  # SimSiam: the online projections, stop-gradient inside the losses
        metrics = {}
        if gsg.enabled:
            if len(views) == 2:  # two_crop: the partner's views are its own two views
                p = jnp.concatenate([p, p[:, partner]])
                t = jnp.concatenate([t, t[:, partner]])
            loss, aux = losses.gsg_loss(*p, *t, rule=gsg.rule, key=route_key)
            for i in range(4):
                metrics[f"choice_frac/{i}"] = jnp.mean(aux["choice"] == i)
            metrics["self_pair_rate"] = jnp.mean(partner == jnp.arange(batch_size))
        else:
            loss, aux = losses.simsiam_loss(p[0], p[1], t[0], t[1])
        metrics["train_z_std"] = evaluate.z_std(jax.lax.stop_gradient(z[0]))
        return loss, (new_state, metrics)

    @property
    def _num_views(self) -> int:
        """Views per image and step: four with GSG's four_crop (two more of the image as a partner)."""
        return 4 if self.config.gsg.enabled and self.config.gsg.crops == "four_crop" else 2

    def train_iterator(self):
        crop = None
        if self.spec.image_shape is None:  # variable-size images: cropped on the host, the rest on the device
            aug = self.config.aug
            crop = data.HostCrop(aug.image_size, self._num_views, tuple(aug.crop_scale), tuple(aug.crop_ratio))
        return data.train_iterator(self.config.data, self.config.batch_size, self.config.seed, crop)

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
            data.eval_batches(source, self.config.eval_batch_size,
                              None if self.spec.image_shape else self.config.aug.image_size), self.mesh)

    def knn(self, params, model_state):
        return evaluate.knn_evaluation(lambda split: self._embed_split(params, model_state, split), self.spec,
                                       self.config.knn)

    def collapse(self, params, model_state):
        """The collapse monitors on the projections of the eval split: z_std and the effective rank."""
        _, z, _ = self._embed_split(params, model_state, self.spec.eval_split)
        z = jnp.asarray(z)
        return {"z_std": float(evaluate.z_std(z)), "effective_rank": float(evaluate.effective_rank(z))}

    @property
    def evaluators(self):
        return {"knn": self.knn, "z_std": self.collapse}


def make_task(config, mesh) -> SiameseTask:
    return SiameseTask(config, mesh)
