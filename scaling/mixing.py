"""mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019): training batches mixed on the device.

Each image is paired with the image at the mirrored position of the batch (image i with image
n-1-i, as timm pairs them: the batch order is already random), and one weight `lam` is drawn a
batch from Beta(alpha, alpha):
- mixup blends the pair, `lam * x + (1 - lam) * partner`;
- CutMix pastes a box of the partner into the image, of side sqrt(1 - lam) of the image's at a
  uniform centre, clipped at the borders; `lam` becomes the share of the image's own pixels.
The targets mix with the same weight (`mix_targets`), after label smoothing, so the two compose.
With both alphas set, each batch takes one of the two at even odds (timm's `switch_prob`); with
probability 1 - `prob` a batch is left as it is. The key comes from the run's key and the step,
so a resumed run mixes exactly as an uninterrupted one.
"""

import jax
import jax.numpy as jnp


def enabled(config) -> bool:
    return config.get("mix_prob", 0.0) > 0 and (
        config.get("mixup_alpha", 0.0) > 0 or config.get("cutmix_alpha", 0.0) > 0
    )


def mix_images(images, key, *, mixup_alpha, cutmix_alpha, prob):
    """(mixed images, lam): the batch mixed with its mirror image; lam is 1 when unmixed."""
    apply_key, choice_key, lam_key, box_key = jax.random.split(key, 4)
    partner = images[::-1]
    candidates = []  # (lam, images) of each method that is on
    if mixup_alpha > 0:
        lam = jax.random.beta(lam_key, mixup_alpha, mixup_alpha)
        blended = lam * images + (1 - lam) * partner
        candidates.append((lam, blended.astype(images.dtype)))
    if cutmix_alpha > 0:
        lam = jax.random.beta(lam_key, cutmix_alpha, cutmix_alpha)
        candidates.append(cut_and_paste(images, partner, lam, box_key))
    (lam, mixed), *rest = candidates
    if rest:  # both on: CutMix at even odds
        use_cutmix = jax.random.bernoulli(choice_key, 0.5)
        lam = jnp.where(use_cutmix, rest[0][0], lam)
        mixed = jnp.where(use_cutmix, rest[0][1], mixed)
    apply = jax.random.bernoulli(apply_key, prob)
    return jnp.where(apply, mixed, images), jnp.where(apply, lam, 1.0)


def cut_and_paste(images, partner, lam, key):
    """CutMix's box: (share of the image's own pixels, images with the partner's box pasted)."""
    _, h, w, _ = images.shape
    ratio = jnp.sqrt(1 - lam)
    cy, cx = jax.random.uniform(key, (2,)) * jnp.array([h, w])
    half_h, half_w = ratio * h / 2, ratio * w / 2
    y0, y1 = jnp.clip(jnp.round(cy - half_h), 0, h), jnp.clip(jnp.round(cy + half_h), 0, h)
    x0, x1 = jnp.clip(jnp.round(cx - half_w), 0, w), jnp.clip(jnp.round(cx + half_w), 0, w)
    ys, xs = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
    box = (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)  # (h, w)
    pasted = jnp.where(box[None, :, :, None], partner, images)
    return 1 - box.mean(), pasted


def mix_targets(targets, lam):
    """Soft targets (n, classes) mixed with their mirror by the images' weight."""
    return lam * targets + (1 - lam) * targets[::-1]
