"""Fit the built-in "tiny" ControlNet (sv2v_core/data/tiny_controlnet.safetensors).

    python tools/fit_tiny_controlnet.py            # about 20 minutes on 2 CPU cores

A ControlNet derived from a UNet (`ControlNetModel.from_unet`, as diffusers
does) starts with zero output convolutions: it changes nothing.  This gives
the tiny one a deterministic, sensible effect, in the spirit of
tools/fit_tiny_model.py.  With the tiny UNet and autoencoder frozen, the
ControlNet (all of it, as in ControlNet training) learns to make the UNet
draw the strokes that only the control image shows:

- data: procedurally drawn sketches (fit_tiny_model.sketch), "before", and
  the same with 1–4 extra pen strokes, mostly dark, "after"; the control
  image is the "after" sketch's "lines" map (a quarter of the time its Canny
  edges);
- input: the noised latent of "before", at timesteps 80–820 (what the
  engine visits at strengths up to 0.8);
- loss, on the implied x0: on the latent pixels of the new strokes, the
  squared error to the clean "after" latent (draw the strokes); everywhere
  else, the squared difference to the UNet's own x0 without the ControlNet
  (change nothing else).  Nothing but the control image tells where the
  strokes are, so the fit cannot ignore it; and the rest of the render stays
  the tiny model's.

A plain ControlNet objective (predict "after" from its own noised latent)
was tried first: over a few hundred steps it learned a control-independent
correction of the UNet at high timesteps and ignored the control image
(held-out error with the right and with another sketch's control image
equal to 1e-4), the slow start ControlNet training is known for.

The new parts (conditioning embedding, zero convolutions) learn at a higher
rate than the copied encoder.  Deterministic for a given --threads (fixed
seeds).  Stored as float16.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fit_tiny_model as base  # noqa: E402  (puts the project root on sys.path)

from sv2v_core import tiny  # noqa: E402
from sv2v_core.control import control_image  # noqa: E402

SEED = base.SEED + 7
T_MIN, T_MAX = 80, 820  # lcm_timesteps(s, 1..4) for s <= 0.8 lie in 99..799
REST_WEIGHT = 4.0       # the change elsewhere, against drawing the strokes
NEW_LR, COPIED_LR = 2e-3, 5e-4
INK = [c for c in base.PEN_COLOURS if c != (255, 255, 255)]


def add_strokes(rng: random.Random, image: np.ndarray) -> np.ndarray:
    """`image` with 1–4 more wobbly pen strokes, mostly dark."""
    size = image.shape[0]
    out = Image.fromarray(image)
    draw = ImageDraw.Draw(out)
    for _ in range(rng.randint(1, 4)):
        colour = rng.choice(INK[:2]) if rng.random() < 0.6 else rng.choice(INK)
        start = rng.uniform(0.05, 0.95) * size, rng.uniform(0.05, 0.95) * size
        points = base.wobbly_line(rng, start, size, most=8, turn=0.7, steps=(0.05, 0.18))
        draw.line(points, fill=colour, width=rng.randint(1, max(2, size // 16)), joint="curve")
    return np.asarray(out)


def dataset(count: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(before, after, control, strokes): images in [-1, 1], control images in [0, 1]
    (count, 3, size, size), and where the new strokes are, (count, 1, size, size) in {0, 1}."""
    rng = random.Random(seed)
    befores, afters, controls = [], [], []
    for _ in range(count):
        before = base.sketch(rng, size)
        after = add_strokes(rng, before)
        befores.append(before)
        afters.append(after)
        controls.append(control_image(after, "canny" if rng.random() < 0.25 else "lines"))
    as_tensor = lambda images: torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()  # noqa: E731
    before, after = as_tensor(befores), as_tensor(afters)
    strokes = ((after - before).abs().amax(dim=1, keepdim=True) > 24).float()
    return before / 127.5 - 1, after / 127.5 - 1, as_tensor(controls) / 255, strokes


def new_parts(controlnet) -> list[torch.nn.Parameter]:
    """The parameters a ControlNet adds to the UNet copy: conditioning embedding and zero convolutions."""
    return [p for name, p in controlnet.named_parameters()
            if name.startswith(("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block."))]


def x0_of(unet, controlnet, x_t, t, a, prompt, control, scale: float = 1.0) -> torch.Tensor:
    """The UNet's x0 prediction, conditioned by `controlnet` (None: plain)."""
    residuals = {}
    if controlnet is not None:
        down, mid = controlnet(x_t, t, prompt, control, conditioning_scale=scale, return_dict=False)
        residuals = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
    eps = unet(x_t, t, prompt, **residuals).sample
    return (x_t - (1 - a).sqrt() * eps) / a.sqrt()


def objective(x0, plain, after, strokes) -> tuple[torch.Tensor, torch.Tensor]:
    """(error on the new strokes toward "after", change elsewhere from the plain x0), each a mean."""
    drawn = ((x0 - after).pow(2) * strokes).sum() / (strokes.sum() * x0.shape[1]).clamp(min=1)
    rest = ((x0 - plain).pow(2) * (1 - strokes)).mean()
    return drawn, rest


def fit(controlnet, unet, data, embeds, scheduler, steps: int, batch: int) -> None:
    before, after, controls, strokes = data
    g = torch.Generator().manual_seed(SEED + 1)
    alphas = scheduler.alphas_cumprod
    new = {id(p) for p in new_parts(controlnet)}
    copied = [p for p in controlnet.parameters() if id(p) not in new]
    opt = torch.optim.AdamW([{"params": new_parts(controlnet), "lr": NEW_LR}, {"params": copied, "lr": COPIED_LR}],
                            weight_decay=0.0)
    sched = base.warmup_cosine(opt, steps)
    controlnet.train()
    start = time.time()
    for step in range(steps):
        idx = torch.randint(0, len(after), (batch,), generator=g)
        # one rotation/flip for latents, control images and stroke masks alike
        k, flip = int(torch.randint(0, 4, (1,), generator=g)), bool(torch.rand((), generator=g) < 0.5)
        move = lambda x: (lambda r: r.flip(-1) if flip else r)(torch.rot90(x, k, dims=(-2, -1)))  # noqa: E731
        z, target, control, mask = move(before[idx]), move(after[idx]), move(controls[idx]), move(strokes[idx])
        prompt = embeds[torch.randint(0, len(embeds), (batch,), generator=g)]
        t = torch.randint(T_MIN, T_MAX + 1, (batch,), generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * z + (1 - a).sqrt() * torch.randn(z.shape, generator=g)
        with torch.no_grad():
            plain = x0_of(unet, None, x_t, t, a, prompt, control)
        drawn, rest = objective(x0_of(unet, controlnet, x_t, t, a, prompt, control), plain, target, mask)
        base.descend(opt, sched, drawn + REST_WEIGHT * rest, clip=controlnet.parameters())
        if step % 50 == 0 or step == steps - 1:
            print(f"  controlnet step {step:5d} strokes {drawn.item():.4f} rest {rest.item():.4f} "
                  f"({time.time() - start:.0f}s)", flush=True)
    controlnet.eval()


@torch.no_grad()
def held_out(controlnet, unet, data, embeds, scheduler, scale: float, shift: int = 0) -> tuple[float, float]:
    """`objective` from the "before" sketches at t = 599 (strength 0.6), with the control at
    `scale`; shift 1 gives each sketch another one's control image."""
    before, after, controls, strokes = data
    g = torch.Generator().manual_seed(SEED + 2)
    t = torch.full((len(after),), 599)
    a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * before + (1 - a).sqrt() * torch.randn(before.shape, generator=g)
    prompt = embeds[:1].expand(len(after), -1, -1)
    plain = x0_of(unet, None, x_t, t, a, prompt, None)
    x0 = x0_of(unet, controlnet, x_t, t, a, prompt, controls.roll(shift, 0), scale)
    return tuple(value.item() for value in objective(x0, plain, after, strokes))


def encoded(vae, data) -> tuple[torch.Tensor, ...]:
    """The dataset with latents for the images and the stroke masks at latent resolution."""
    before, after, controls, strokes = data
    encode = lambda images: torch.cat([vae.encode(c).latents for c in images.split(40)])  # noqa: E731
    return encode(before), encode(after), controls, torch.nn.functional.max_pool2d(strokes, 8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--count", type=int, default=1200, help="training sketches (128 px)")
    parser.add_argument("--out", type=Path, default=tiny.CONTROLNET_FILE)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # results are reproducible for a given thread count
    started = time.time()

    unet, vae = tiny.make_unet(), tiny.make_vae()
    tiny.load_weights(unet, vae)
    for module in (unet, vae):
        module.eval().requires_grad_(False)
    torch.manual_seed(SEED)
    controlnet = tiny.make_controlnet(unet)
    scheduler = tiny.make_scheduler()
    embeds = base.embed(base.training_prompts(random.Random(SEED)), tiny.load_tokenizer(), tiny.make_text_encoder())

    print("data: drawing and encoding sketches", flush=True)
    with torch.no_grad():
        data = encoded(vae, dataset(args.count, 128, SEED))
        test = encoded(vae, dataset(64, 128, SEED + 99))
    print(f"  {len(data[0])} sketches ({time.time() - started:.0f}s)", flush=True)

    report = lambda label, values: print(f"  held-out x0 error at t=599, {label}: on the new strokes "  # noqa: E731
                                         f"{values[0]:.4f}, change elsewhere {values[1]:.4f}")
    report("without control", held_out(controlnet, unet, test, embeds, scheduler, 0.0))
    fit(controlnet, unet, data, embeds, scheduler, args.steps, args.batch)
    for scale in (0.5, 1.0):
        report(f"control scale {scale}", held_out(controlnet, unet, test, embeds, scheduler, scale))
    report("scale 1.0, another sketch's control", held_out(controlnet, unet, test, embeds, scheduler, 1.0, shift=1))

    from safetensors.torch import save_file

    state = {k: v.half().contiguous() for k, v in controlnet.state_dict().items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    elapsed = time.time() - started
    save_file(state, str(args.out), metadata={
        "format": "pt", "made_by": "tools/fit_tiny_controlnet.py", "seed": str(SEED), "steps": str(args.steps),
        "fit_seconds": f"{elapsed:.0f}"})
    args.out.chmod(0o644)
    print(f"saved {args.out} ({args.out.stat().st_size / 1e6:.2f} MB) after {elapsed:.0f}s")


if __name__ == "__main__":
    main()
