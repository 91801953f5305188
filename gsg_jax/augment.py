"""On-device image augmentation (MoCo-v2 / SimSiam recipe), run per example inside the jitted train step.

Every random decision is an array (jnp.where / lax.switch on a drawn uniform), so `augment` traces once and
is jit- and vmap-compatible; the config is static (read at trace time). Under vmap a random branch becomes a
select, so both sides of every "with probability p" are computed: cheap at the image sizes used here.

Differences from torchvision, on purpose (dm_pix / TF semantics, as in BYOL's and SimCLR's JAX/TF code):
- colour jitter: brightness is additive (x + U[-b, b]) rather than multiplicative, contrast blends with the
  per-channel mean, saturation and hue act in HSV. The four ops run in a random order per example, like
  torchvision's ColorJitter, and the image is clipped to [0, 1] after each.
- Gaussian blur: kernel about 10% of the output size (odd, at least 3), reflect padding at the border.
"""
import math

import dm_pix as pix
import jax
import jax.numpy as jnp
import ml_collections

# Per-channel statistics of [0, 1] pixels, for cfg.mean / cfg.std.
DATASET_STATS = {
    "imagenet2012": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    "fashion_mnist": ((0.2860,), (0.3530,)),  # measured on the 60,000 training images
}

_CROP_TRIES = 10  # candidate crops drawn at once; the first that fits is used (torchvision also tries 10)


def default_augment_config() -> ml_collections.ConfigDict:
    """MoCo-v2 augmentation defaults (ImageNet); override image_size, mean, std per dataset."""
    mean, std = DATASET_STATS["imagenet2012"]
    return ml_collections.ConfigDict(dict(
        image_size=224,
        crop_scale=(0.2, 1.0),           # area fraction of the crop
        crop_ratio=(3 / 4, 4 / 3),       # aspect ratio w/h, sampled log-uniformly
        flip_prob=0.5,
        color_jitter=(0.4, 0.4, 0.4, 0.1),  # brightness, contrast, saturation, hue
        color_jitter_prob=0.8,
        grayscale_prob=0.2,
        # (first view, second view) of each image: BYOL's asymmetric set is blur (1.0, 0.1), solarize (0, 0.2).
        blur_prob=(0.5, 0.5),            # SimSiam's CIFAR recipe sets this to 0
        blur_sigma=(0.1, 2.0),           # in output pixels
        solarize_prob=(0.0, 0.0),
        mean=mean,
        std=std,
    ))


def _to_unit_float(image):
    """uint8 (or any integer) pixels -> [0, 1] float32; float input is taken to be in [0, 1] already."""
    if jnp.issubdtype(image.dtype, jnp.integer):
        return image.astype(jnp.float32) / 255.0
    return image.astype(jnp.float32)


def _normalise(x, cfg):
    c = x.shape[-1]
    if len(cfg.mean) != c or len(cfg.std) != c:
        raise ValueError(f"augment config mean={tuple(cfg.mean)} / std={tuple(cfg.std)} must have one entry "
                         f"per image channel ({c}); set config mean/std for this dataset.")
    return (x - jnp.asarray(cfg.mean, jnp.float32)) / jnp.asarray(cfg.std, jnp.float32)


def _lerp(u, lo, hi):
    return lo + (hi - lo) * u


def _crop_window(u, height, width, scale, ratio):
    """torchvision RandomResizedCrop.get_params, vectorised over the tries; u: 2 * tries + 2 uniforms.
    Returns (top, left, h, w) as int32 scalars."""
    n = _CROP_TRIES
    target = height * width * _lerp(u[:n], scale[0], scale[1])
    log_ratio = _lerp(u[n:2 * n], math.log(ratio[0]), math.log(ratio[1]))
    aspect = jnp.exp(log_ratio)
    ws = jnp.round(jnp.sqrt(target * aspect)).astype(jnp.int32)
    hs = jnp.round(jnp.sqrt(target / aspect)).astype(jnp.int32)
    fits = (ws > 0) & (ws <= width) & (hs > 0) & (hs <= height)
    first = jnp.argmax(fits)  # index of the first candidate that fits (0 if none does)

    # Fallback when no candidate fits: the largest centred crop with the ratio clamped to `ratio` (static).
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(height * max(ratio))), height
    else:
        fw, fh = width, height

    ok = fits.any()
    h = jnp.where(ok, hs[first], fh)
    w = jnp.where(ok, ws[first], fw)
    # Uniform integer offsets in [0, height - h] and [0, width - w].
    top = jnp.minimum(jnp.floor(u[2 * n] * (height - h + 1)).astype(jnp.int32), height - h)
    left = jnp.minimum(jnp.floor(u[2 * n + 1] * (width - w + 1)).astype(jnp.int32), width - w)
    top = jnp.where(ok, top, (height - fh) // 2)
    left = jnp.where(ok, left, (width - fw) // 2)
    return top, left, h, w


def _random_resized_crop(u, x, cfg):
    height, width, c = x.shape
    size = cfg.image_size
    top, left, h, w = _crop_window(u, height, width, cfg.crop_scale, cfg.crop_ratio)
    # Output pixel centre (o + 0.5) samples input (o + 0.5) / s + offset: maps [0, size) onto the crop window.
    s = jnp.stack([size / h, size / w]).astype(jnp.float32)
    t = -jnp.stack([top, left]).astype(jnp.float32) * s
    return jax.image.scale_and_translate(x, (size, size, c), (0, 1), s, t, method="linear", antialias=True)


def _color_jitter(u, x, strengths):
    """u: 8 uniforms (4 op strengths, 4 for the op order). A single-channel image gets brightness and
    contrast only (saturation and hue have no meaning there), in a random order."""
    b, c, s, h = strengths
    delta_b = _lerp(u[0], -b, b)
    factor_c = _lerp(u[1], max(0.0, 1 - c), 1 + c)
    factor_s = _lerp(u[2], max(0.0, 1 - s), 1 + s)
    delta_h = _lerp(u[3], -h, h)
    ops = [
        lambda y: jnp.clip(pix.adjust_brightness(y, delta_b), 0.0, 1.0),
        lambda y: jnp.clip(pix.adjust_contrast(y, factor_c), 0.0, 1.0),
        lambda y: jnp.clip(pix.adjust_saturation(y, factor_s), 0.0, 1.0),
        lambda y: jnp.clip(pix.adjust_hue(y, delta_h), 0.0, 1.0),
    ][:4 if x.shape[-1] == 3 else 2]
    order = jnp.argsort(u[4:4 + len(ops)])  # a uniformly random permutation: random op order per example
    for i in range(len(ops)):
        x = jax.lax.switch(order[i], ops, x)
    return x


def _gaussian_blur(x, sigma, image_size):
    radius = max(1, int(0.1 * image_size) // 2)  # kernel 2r+1 ~ 10% of the image (23 px at 224, 3 at 32)
    padded = jnp.pad(x, ((radius, radius), (radius, radius), (0, 0)), mode="reflect")
    return pix.gaussian_blur(padded, sigma, 2 * radius + 1, padding="VALID")


def _for_view(prob, view):
    """A probability given once, or as (first view, second view)."""
    return prob[view] if isinstance(prob, (tuple, list)) else prob


def augment(image, key, cfg, view=0, crop=True):
    """One example. image: uint8 or float [H, W, C] (C = 1 or 3; float in [0, 1]), key: PRNG key,
    cfg: ConfigDict (see default_augment_config). Returns float32 [cfg.image_size, cfg.image_size, C],
    normalised by cfg.mean / cfg.std (per channel, applied to [0, 1] pixel values).

    view: 0 or 1, the first or second view of an image, for per-view probabilities (blur, solarize).
    crop=False: the image is already a random crop of cfg.image_size px (cropped on the host).
    Order: random resized crop, horizontal flip, colour jitter (random op order; brightness and contrast
    only when C == 1), grayscale (C == 3 only), Gaussian blur, solarize, normalise."""
    x = _to_unit_float(image)
    # All randomness comes from one draw of uniforms: XLA:CPU compiles each vmapped non-scalar
    # jax.random call slowly (seconds), so one call instead of a dozen keeps the train step's compile short.
    n_crop = 2 * _CROP_TRIES + 2
    u = jax.random.uniform(key, (n_crop + 14,))
    u_crop, u_jit = u[:n_crop], u[n_crop:n_crop + 8]
    u_flip, u_jit_p, u_gray, u_sigma, u_blur_p, u_sol = u[-6:]

    if crop:
        x = _random_resized_crop(u_crop, x, cfg)
    elif x.shape[:2] != (cfg.image_size, cfg.image_size):
        raise ValueError(f"host-cropped views are {x.shape[:2]}, not aug.image_size={cfg.image_size}.")
    x = jnp.where(u_flip < cfg.flip_prob, pix.flip_left_right(x), x)

    # Brightness and contrast jitter matter for grayscale input too: with crops and flips alone, matching
    # two views by their intensity histogram is a shortcut that the encoder learns instead of shapes.
    x = jnp.where(u_jit_p < cfg.color_jitter_prob, _color_jitter(u_jit, x, cfg.color_jitter), x)
    if x.shape[-1] == 3:  # static: grayscale conversion makes no sense for one channel (Fashion-MNIST)
        x = jnp.where(u_gray < cfg.grayscale_prob, pix.rgb_to_grayscale(x, keep_dims=True), x)

    sigma = _lerp(u_sigma, *cfg.blur_sigma)
    x = jnp.where(u_blur_p < _for_view(cfg.blur_prob, view), _gaussian_blur(x, sigma, cfg.image_size), x)

    x = jnp.where(u_sol < _for_view(cfg.solarize_prob, view), pix.solarize(x, 0.5), x)
    return _normalise(x, cfg)


def augment_batch(images, keys, cfg, view=0, crop=True):
    """images [B, H, W, C], keys [B] (one key per example) -> float32 [B, S, S, C]."""
    return jax.vmap(lambda im, k: augment(im, k, cfg, view, crop))(images, keys)


def preprocess_eval(images, cfg):
    """Deterministic eval transform: [B, H, W, C] uint8 -> float32 [B, S, S, C], resized (bilinear,
    antialiased, whole image) only if H, W != cfg.image_size, then normalised."""
    x = _to_unit_float(images)
    b, height, width, c = x.shape
    size = cfg.image_size
    if (height, width) != (size, size):
        x = jax.image.resize(x, (b, size, size, c), method="linear", antialias=True)
    return _normalise(x, cfg)
