"""Build the shipped data of the built-in "tiny" model (sv2v_core/data/).

    python tools/fit_tiny_model.py            # tokenizer + autoencoder + UNet
    python tools/fit_tiny_model.py --only tokenizer

1. Tokenizer: converts open_clip's MIT-licensed CLIP BPE file
   (bpe_simple_vocab_16e6.txt.gz, shipped in the open_clip_torch wheel) into
   the vocab.json + merges.txt pair that `CLIPTokenizer.from_pretrained` reads.
2. Autoencoder: fits the scaled-down AutoencoderTiny to reconstruct
   procedurally generated sketch-like images (strokes thin to thick, shapes,
   flat fills in saturated colours, gradients, landscape-like scenes with sky,
   hills, sun and houses, some photo-like texture), with an extra term on the
   8x8-block colour means so flat regions keep their hue, keeping its latents
   near zero mean and unit variance like SD's.
3. UNet: fits the tiny UNet as an epsilon predictor on those latents (the loss
   is measured on the implied x0), at the timesteps the engine visits at
   strength <= 0.4 (80..420; lcm_timesteps gives 399/299/199/99) with the
   engine's noising, under assorted prompts: an img2img step returns a
   smoothed copy of its input whatever the prompt.

Deterministic for a given --threads (fixed seeds); about 15 minutes on 2 CPU cores.
Weights are stored as float16 in sv2v_core/data/tiny_model.safetensors.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sv2v_core import tiny  # noqa: E402

SEED = 20240611
T_MIN, T_MAX = 80, 420  # the UNet is fitted where the engine uses it: lcm_timesteps(0.4, 1..4) lie in 99..399


# ----------------------------------------------------------------------------- tokenizer

def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes used by CLIP's byte-level BPE, in vocabulary order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    symbols = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in printable] + [symbols[b] for b in range(256) if b not in printable]


def build_tokenizer(out_dir: Path) -> None:
    import open_clip

    bpe_path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe_path, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # line 0 is a header; CLIP uses this many merges
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == 49408, len(tokens)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    config = dict(special, model_max_length=77, do_lower_case=True, tokenizer_class="CLIPTokenizer")
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    license_src = next(Path(open_clip.__file__).parent.parent.glob("open_clip_torch-*.dist-info/licenses/LICENSE"))
    (out_dir / "LICENSE-open_clip.txt").write_text(
        "vocab.json and merges.txt are converted from open_clip's bpe_simple_vocab_16e6.txt.gz,\n"
        "distributed under the following licence:\n\n" + license_src.read_text()
    )
    print(f"tokenizer: {len(tokens)} tokens, {len(merges)} merges -> {out_dir}")


# ----------------------------------------------------------------------------- synthetic sketches

PEN_COLOURS = [(0, 0, 0), (40, 40, 40), (200, 30, 30), (30, 60, 200), (30, 150, 60), (240, 200, 20), (250, 130, 20),
               (140, 60, 170), (220, 20, 20), (120, 70, 40), (255, 255, 255), (20, 180, 200), (230, 80, 160)]
SKY_COLOURS = [(130, 190, 240), (90, 150, 230), (40, 90, 200), (180, 220, 250), (250, 200, 150), (60, 60, 120)]
GROUND_COLOURS = [(80, 160, 70), (40, 130, 50), (100, 190, 60), (150, 120, 70), (200, 180, 120), (30, 100, 140)]


def _jitter(rng: random.Random, colour, amount: int = 25) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-amount, amount))) for c in colour)


def _colour(rng: random.Random) -> tuple[int, int, int]:
    r = rng.random()
    if r < 0.45:
        return rng.choice(PEN_COLOURS)
    if r < 0.75:  # a saturated colour: one channel high, one low
        hi, lo = rng.sample(range(3), 2)
        c = [rng.randrange(256) for _ in range(3)]
        c[hi], c[lo] = rng.randint(170, 255), rng.randint(0, 70)
        return tuple(c)
    return tuple(rng.randrange(256) for _ in range(3))


def _gradient(rng: random.Random, size: int, a, b, angle: float | None = None) -> np.ndarray:
    a, b = np.array(a, np.float32), np.array(b, np.float32)
    angle = rng.uniform(0, 2 * math.pi) if angle is None else angle
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy)
    ramp = (ramp - ramp.min()) / (np.ptp(ramp) + 1e-6)
    return a + (b - a) * ramp[..., None]


def _texture(rng: random.Random, size: int, base: np.ndarray) -> np.ndarray:
    """Photo-like variation: smooth low-frequency colour noise plus some grain."""
    cells = rng.choice([2, 3, 4, 6, 8])
    low = np.array([[[rng.gauss(0, 1) for _ in range(3)] for _ in range(cells)] for _ in range(cells)], np.float32)
    low = np.asarray(Image.fromarray(((low - low.min()) / (np.ptp(low) + 1e-6) * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC), np.float32)
    out = base + (low - 127.5) * rng.uniform(0.1, 0.5)
    if rng.random() < 0.5:
        grain = np.array([rng.gauss(0, 1) for _ in range(size * size)], np.float32).reshape(size, size, 1)
        out = out + grain * rng.uniform(3, 15)
    return np.clip(out, 0, 255)


def _scene(rng: random.Random, size: int, draw: ImageDraw.ImageDraw) -> None:
    """A landscape-like picture: hill(s), sun, maybe a house or a tree (the sky is the background)."""
    s = size
    for _ in range(rng.randint(1, 2)):
        ground = _jitter(rng, rng.choice(GROUND_COLOURS))
        top = rng.uniform(0.45, 0.8) * s
        if rng.random() < 0.5:
            w = rng.uniform(0.8, 2.0) * s
            cx = rng.uniform(0, s)
            draw.ellipse([cx - w / 2, top, cx + w / 2, top + rng.uniform(0.6, 1.5) * s], fill=ground)
        else:
            pts = [(-5, s + 5)] + [(x * s / 4, top + rng.uniform(-0.15, 0.15) * s) for x in range(5)] + [(s + 5, s + 5)]
            draw.polygon(pts, fill=ground)
    if rng.random() < 0.7:
        r = rng.uniform(0.06, 0.14) * s
        cx, cy = rng.uniform(0.1, 0.9) * s, rng.uniform(0.05, 0.35) * s
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=_jitter(rng, rng.choice([(250, 210, 30), (255, 240, 120), (250, 150, 30)])))
    if rng.random() < 0.6:  # a house: walls, roof, door, windows
        w = rng.uniform(0.2, 0.45) * s
        h = w * rng.uniform(0.6, 1.0)
        x0, y1 = rng.uniform(0, s - w), rng.uniform(0.6, 0.85) * s
        y0 = y1 - h
        outline = (60, 30, 20) if rng.random() < 0.5 else None
        draw.rectangle([x0, y0, x0 + w, y1], fill=_colour(rng), outline=outline, width=max(1, s // 96))
        draw.polygon([(x0 - 0.1 * w, y0), (x0 + w / 2, y0 - 0.5 * h), (x0 + 1.1 * w, y0)], fill=_colour(rng))
        dw = w * 0.2
        draw.rectangle([x0 + w / 2 - dw / 2, y1 - 0.5 * h, x0 + w / 2 + dw / 2, y1], fill=_colour(rng))
        for wx in (x0 + 0.12 * w, x0 + 0.72 * w):
            draw.rectangle([wx, y0 + 0.2 * h, wx + 0.16 * w, y0 + 0.38 * h], fill=_jitter(rng, (240, 230, 180)))
    if rng.random() < 0.4:  # a tree
        x, y = rng.uniform(0.05, 0.95) * s, rng.uniform(0.55, 0.85) * s
        tw, r = rng.uniform(0.02, 0.05) * s, rng.uniform(0.08, 0.16) * s
        draw.rectangle([x - tw, y - 2 * r, x + tw, y], fill=_jitter(rng, (110, 70, 40)))
        draw.ellipse([x - r, y - 3.2 * r, x + r, y - 1.4 * r], fill=_jitter(rng, (40, 140, 50)))


def wobbly_line(rng: random.Random, start: tuple[float, float], size: int, most: int, turn: float,
                steps: tuple[float, float]) -> list[tuple[float, float]]:
    """A pen stroke's points from `start`: 2 to `most` segments, each turning up to ±`turn` radians,
    `steps` long (fractions of `size`)."""
    x, y = start
    points, heading = [(x, y)], rng.uniform(0, 2 * math.pi)
    for _ in range(rng.randint(2, most)):
        heading += rng.uniform(-turn, turn)
        step = rng.uniform(*steps) * size
        x, y = x + step * math.cos(heading), y + step * math.sin(heading)
        points.append((x, y))
    return points


def sketch(rng: random.Random, size: int) -> np.ndarray:
    """One sketch-like RGB image (uint8 HxWx3): a canvas with strokes, shapes, fills, gradients, or a scene."""
    kind = rng.random()
    scene = False
    if kind < 0.3:
        base = np.full((size, size, 3), 255, np.float32)
    elif kind < 0.45:
        base = np.full((size, size, 3), _colour(rng), np.float32)
    elif kind < 0.6:
        base = _gradient(rng, size, _colour(rng), _colour(rng))
    else:  # a scene: sky (flat or a vertical gradient) with landscape shapes
        sky = _jitter(rng, rng.choice(SKY_COLOURS))
        base = _gradient(rng, size, sky, _jitter(rng, sky, 50), angle=math.pi / 2) if rng.random() < 0.5 else np.full((size, size, 3), sky, np.float32)
        scene = True
    if rng.random() < 0.2:
        base = _texture(rng, size, base)
    image = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    if scene:
        _scene(rng, size, draw)

    def point():
        return (rng.uniform(-0.1, 1.1) * size, rng.uniform(-0.1, 1.1) * size)

    for _ in range(rng.randint(0 if scene else 1, 3 if scene else 7)):
        shape = rng.random()
        colour = _colour(rng)
        if shape < 0.45:  # a pen stroke: a wobbly polyline, thin to thick
            pts = wobbly_line(rng, point(), size, most=12, turn=0.8, steps=(0.03, 0.15))
            draw.line(pts, fill=colour, width=rng.randint(1, max(2, size // 8)), joint="curve")
        else:
            (x0, y0), (x1, y1) = point(), point()
            box = [min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)]
            filled = rng.random() < 0.6
            width = rng.randint(1, max(2, size // 16))
            if shape < 0.65:
                draw.ellipse(box, fill=colour if filled else None, outline=colour, width=width)
            elif shape < 0.85:
                draw.rectangle(box, fill=colour if filled else None, outline=colour, width=width)
            else:
                pts = [point() for _ in range(rng.randint(3, 5))]
                draw.polygon(pts, fill=colour if filled else None, outline=colour, width=width)
    return np.asarray(image)


def sketches(count: int, size: int, seed: int) -> torch.Tensor:
    """`count` sketches as a float tensor in [-1, 1], shape (count, 3, size, size)."""
    rng = random.Random(seed)
    images = np.stack([sketch(rng, size) for _ in range(count)])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


# ----------------------------------------------------------------------------- prompts

NOUNS = ["cat", "house", "tree", "face", "car", "flower", "mountain", "boat", "dog", "city", "bird", "robot"]
FILLERS = ["", "a drawing of a", "a watercolor of a", "a photo of a", "portrait of a", "a detailed", "cute", "an old"]


def training_prompts(rng: random.Random) -> list[str]:
    """Assorted prompts: the UNet learns to follow the image whatever the (random) text encoder says."""
    return [""] + [f"{rng.choice(FILLERS)} {rng.choice(NOUNS)}".strip() for _ in range(120)]


@torch.no_grad()
def embed(prompts: list[str], tokenizer, text_encoder) -> torch.Tensor:
    ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids)[0]


# ----------------------------------------------------------------------------- fitting

def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a - b) / 2).pow(2).mean().item()
    return 10 * math.log10(1 / max(mse, 1e-10))


def warmup_cosine(opt: torch.optim.Optimizer, steps: int, warmup: int = 20):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def descend(opt: torch.optim.Optimizer, sched, loss: torch.Tensor, clip=None) -> None:
    """One optimiser step on `loss` (gradient norm clipped to 1 over `clip`, when given)."""
    opt.zero_grad()
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(clip, 1.0)
    opt.step()
    sched.step()


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    k = int(torch.randint(0, 4, (1,), generator=g))
    x = torch.rot90(x, k, dims=(-2, -1))
    return x.flip(-1) if torch.rand((), generator=g) < 0.5 else x


def fit_vae(vae, images: torch.Tensor, steps: int, batch: int, crop: int) -> None:
    g = torch.Generator().manual_seed(SEED + 1)
    opt = torch.optim.Adam(vae.parameters(), lr=1.5e-3)
    sched = warmup_cosine(opt, steps)
    vae.train()
    start = time.time()
    for step in range(steps):
        idx = torch.randint(0, len(images), (batch,), generator=g)
        off = torch.randint(0, images.shape[-1] - crop + 1, (2,), generator=g)
        x = augment(images[idx, :, off[0] : off[0] + crop, off[1] : off[1] + crop], g)
        z = vae.encode(x).latents
        # keep latents SD-like (about zero mean, unit variance per channel) so the
        # scheduler's noise levels mean what they mean for a real model
        mean, std = z.mean(dim=(0, 2, 3)), z.std(dim=(0, 2, 3))
        reg = mean.pow(2).mean() + (std - 1).pow(2).mean()
        noisy = z + 0.1 * torch.randn(z.shape, generator=g)  # decoder tolerates imperfect latents
        y = vae.decode(noisy).sample
        # colour term: the 8x8-block means (what a latent pixel stands for) must come back exactly,
        # so flat regions keep their hue (blue sky stays blue, green hill stays green)
        low = torch.nn.functional.avg_pool2d(y - x, 8)
        loss = (y - x).abs().mean() + (y - x).pow(2).mean() + low.abs().mean() + 2 * low.pow(2).mean() + 0.05 * reg
        descend(opt, sched, loss)
        if step % 50 == 0 or step == steps - 1:
            print(f"  vae step {step:5d} loss {loss.item():.4f} psnr {psnr(y.detach(), x):5.2f} "
                  f"latent std {std.mean().item():.2f} ({time.time() - start:.0f}s)", flush=True)
    vae.eval()


def fit_unet(unet, latent_sets: list[torch.Tensor], embeds: torch.Tensor, scheduler, steps: int, batches: list[int]) -> None:
    """Fit `unet` as an epsilon predictor on latents (N, 4, h, w), measuring the loss on the implied x0.

    Steps cycle through `latent_sets` (one latent size each, `batches[i]` at a time).  Timesteps are
    drawn from the range the engine visits at strength <= 0.4 (lcm_timesteps: 399, 299, 199, 99),
    noised as the engine noises: x_t = sqrt(a) z + sqrt(1 - a) eps.
    """
    g = torch.Generator().manual_seed(SEED + 2)
    alphas = scheduler.alphas_cumprod
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=0.0)
    sched = warmup_cosine(opt, steps)
    unet.train()
    start = time.time()
    for step in range(steps):
        latents, batch = latent_sets[step % len(latent_sets)], batches[step % len(latent_sets)]
        z = augment(latents[torch.randint(0, len(latents), (batch,), generator=g)], g)
        prompt = embeds[torch.randint(0, len(embeds), (batch,), generator=g)]
        t = torch.randint(T_MIN, T_MAX + 1, (batch,), generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        noise = torch.randn(z.shape, generator=g)
        x_t = a.sqrt() * z + (1 - a).sqrt() * noise
        eps = unet(x_t, t, prompt).sample
        x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
        loss = (x0 - z).pow(2).mean() + 0.1 * (eps - noise).pow(2).mean()
        descend(opt, sched, loss, clip=unet.parameters())
        if step % 50 == 0 or step == steps - 1:
            print(f"  unet step {step:5d} loss {loss.item():.4f} ({time.time() - start:.0f}s)", flush=True)
    unet.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["tokenizer", "models"], help="build only this part")
    parser.add_argument("--vae-steps", type=int, default=1800)
    parser.add_argument("--unet-steps", type=int, default=1500)
    parser.add_argument("--out", type=Path, default=tiny.WEIGHTS_FILE)
    parser.add_argument("--reuse-vae", type=Path, help="take the autoencoder from this weights file; fit only the UNet")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # results are reproducible for a given thread count
    if args.only != "models":
        build_tokenizer(tiny.TOKENIZER_DIR)
    if args.only == "tokenizer":
        return

    started = time.time()
    torch.manual_seed(SEED)  # the modules' own init
    unet, vae = tiny.make_unet(), tiny.make_vae()
    if args.reuse_vae:
        tiny.load_weights(tiny.make_unet(), vae, args.reuse_vae)
    else:
        print("autoencoder: fitting on synthetic sketches", flush=True)
        fit_vae(vae, sketches(2000, 96, SEED), args.vae_steps, batch=8, crop=64)
    test = sketches(64, 96, SEED + 99)
    with torch.no_grad():
        print(f"  held-out psnr {psnr(vae.decode(vae.encode(test).latents).sample, test):.2f} dB")

    print("unet: encoding latents", flush=True)
    with torch.no_grad():  # 128 px -> 16x16 latents, so attention sees more than a handful of tokens
        latent_sets = [torch.cat([vae.encode(chunk).latents for chunk in sketches(count, size, SEED + size).split(40)])
                       for count, size in ((640, 128),)]
    for latents in latent_sets:
        print(f"  latents {tuple(latents.shape)} std {latents.std().item():.2f} ({time.time() - started:.0f}s)")
    embeds = embed(training_prompts(random.Random(SEED)), tiny.load_tokenizer(), tiny.make_text_encoder())
    fit_unet(unet, latent_sets, embeds, tiny.make_scheduler(), args.unet_steps, batches=[8])

    state = {f"unet.{k}": v.half().contiguous() for k, v in unet.state_dict().items()}
    state.update({f"vae.{k}": v.half().contiguous() for k, v in vae.state_dict().items()})
    from safetensors.torch import save_file

    args.out.parent.mkdir(parents=True, exist_ok=True)
    elapsed = time.time() - started
    save_file(state, str(args.out), metadata={
        "format": "pt", "made_by": "tools/fit_tiny_model.py", "seed": str(SEED),
        "vae_steps": str(args.vae_steps), "unet_steps": str(args.unet_steps), "fit_seconds": f"{elapsed:.0f}"})
    args.out.chmod(0o644)
    print(f"saved {args.out} ({args.out.stat().st_size / 1e6:.2f} MB) after {elapsed:.0f}s")


if __name__ == "__main__":
    main()
