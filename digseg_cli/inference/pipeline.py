"""The DiGSeg pipeline: from one image and K prompts to per-prompt probabilities and a label map.

`load_pipeline` resolves a name (compact config, checkpoint folder, SD base folder, registry name or Hub
id) to a `DigsegPipeline`; calling the pipeline runs the numbered steps of DESIGN §1.6–1.8. Arrays and PIL
images go in, tensors come out (`SegmentationOutput`, re-exported from `calls.py` with what a call resolves).
File writing, overlays and the command line live elsewhere; tiling is `tiling.py`'s, large images `blocks.py`'s.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from digseg_cli.core import diffusion, transforms
from digseg_cli.core.labels import PROMPTED_MODE, class_means, labels_from_probs, prompt_thresholds
from digseg_cli.core.model import memory_format_of
from digseg_cli.errors import UsageError
from digseg_cli.inference.calls import OUTPUTS, CallSettings, PreparedCall, SegmentationOutput
from digseg_cli.inference.compiling import compile_pipeline
from digseg_cli.inference.fast_parts import resolve_part
from digseg_cli.inference.many_prompts import segment_labels
from digseg_cli.inference.overflow import upcast_after_overflow
from digseg_cli.inference.prompts import PromptClass, resolve_thresholds
from digseg_cli.inference.tiling import blend_windows
from digseg_cli.models.checkpoint import LoadedModel, save_checkpoint
from digseg_cli.models.loader import load_model

log = logging.getLogger("digseg")
Prompt = str | Sequence[str]  # a class name, or a class's synonyms whose scores are averaged
# When tiles share a call on a CPU (or MPS), (tile, prompt) pairs × pixels per tile stay under this budget:
# there batching pays only while calls are launch-bound: the demo's 192 px tiles with one prompt ran 20 % faster
# two per call than one, and 20 % slower sixteen per call than two. A GPU keeps gaining up to its memory.
PAIR_PIXELS_PER_CALL = {"cpu": 2**17}
# Decoder pairs per call on a CPU: the demo's fast decoder took 1.1 ms a pair 4 at a time, 2.1 ms 16 at a time
# (16 is the U-Net's fastest batch), so each U-Net batch is decoded in slices of four.
DECODE_BATCH = {"cpu": 4}


class DigsegPipeline:
    """Holds the model on one device; `__call__` segments one image."""

    def __init__(
        self,
        loaded: LoadedModel,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        prepare: bool = True,
        memory_format: str = "channels_last",
    ):
        self.loaded = loaded
        self.model, self.tokenizer, self.config = loaded.model, loaded.tokenizer, loaded.config
        self.device, self.dtype = torch.device(device), dtype
        if prepare:  # a trainer validating its own model (prepare=False) keeps it where and as it is
            self.model.requires_grad_(False).eval().to(self.device, dtype)
            self.memory_format = memory_format
        if prepare and self.device.type == "mps":  # fp16 VAEs give NaN/black output on MPS (performance.md §3.1)
            self.model.vae.to(torch.float32)
        self.scheduler = diffusion.make_scheduler(loaded.scheduler_config)
        self._prompt_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.batch_size = 1 if self.device.type == "mps" else 16
        self.decode_batch_size = DECODE_BATCH.get(self.device.type)  # None: the U-Net's batch
        self.notes: list[str] = []  # what the pipeline changed on its own (fp32 after an overflow), for run logs
        self.compiled = None  # `inference.compiling.compile_pipeline`'s record of what it compiled

    @property
    def memory_format(self) -> str:
        """The U-Net's layout, "channels_last" (the default: faster on every device measured) or "contiguous";
        setting it moves the U-Net, the VAE and the fast decoder in place (`DigsegModel.to_memory_format`)."""
        return "channels_last" if memory_format_of(self.model.unet) == torch.channels_last else "contiguous"

    @memory_format.setter
    def memory_format(self, name: str) -> None:
        try:
            self.model.to_memory_format(name)
        except ValueError as exc:
            raise UsageError(str(exc)) from None

    # -- prompts -------------------------------------------------------------------------------------
    def format_prompt(self, name: str, template: str | None = None) -> str:
        return (template or self.config.prompt_template).format(name=name.strip())

    @torch.no_grad()
    def encode_prompts(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts → (`[K,L,D]`, `[K,D]`) through the text encoder, cached per text for the pipeline's life."""
        new = [t for t in dict.fromkeys(texts) if t not in self._prompt_cache]
        if new:
            padded = dict(padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True)
            tok = self.tokenizer(new, return_tensors="pt", **padded)
            emb, pooled = self.model.encode_prompt(tok.input_ids.to(self.device))  # [n,L,D], [n,D]
            for i, text in enumerate(new):
                self._prompt_cache[text] = (emb[i], pooled[i])
        return (
            torch.stack([self._prompt_cache[t][0] for t in texts]),
            torch.stack([self._prompt_cache[t][1] for t in texts]),
        )

    def check_prompt(self, text: str) -> list[str]:
        """Warnings for one prompt the model may not understand (`inference.prompt_checks`)."""
        from digseg_cli.inference.prompt_checks import prompt_warnings

        return prompt_warnings(self, text)

    # -- the numbered steps --------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        image,
        prompts: Sequence[Prompt],
        *,
        steps: int | None = None,
        ensemble: int | None = None,
        seed: int | None = None,
        resolution: int | None = None,
        threshold: float | Sequence[float] | None = None,
        tile: int | str | None = "auto",
        overlap: float = 0.25,
        prompt_template: str | None = None,
        decoder: str = "auto",
        spread: bool = False,
        encoder: str = "auto",
        output: str = "probs",
    ) -> SegmentationOutput:
        """Segment `image` (PIL image or `[H,W,3]` uint8 array) with one class per item of `prompts`.

        `decoder`, `encoder`: "vae" (the VAE's), "fast" (the checkpoint's distilled one) or "auto" (fast when the
        checkpoint has one that passed its accuracy check, else vae). `spread`: also the members' spread
        (`SegmentationOutput.spread`) when the ensemble has two members or more. `output`: "probs" (every map:
        memory grows with the prompts) or "labels" (the label map alone, prompts run in chunks: bounded memory,
        `inference.many_prompts`; `probs`, `masks` and `spread` are then None)."""
        t_start = time.perf_counter()
        # 0–1. Resolve defaults from the checkpoint config, check the settings and prompts, then the image.
        settings = dict(steps=steps, ensemble=ensemble, seed=seed, resolution=resolution, threshold=threshold)
        more = dict(overlap=overlap, prompt_template=prompt_template, decoder=decoder, spread=spread, encoder=encoder)
        if output not in OUTPUTS:
            raise UsageError(f"`output` must be one of {', '.join(OUTPUTS)}, got {output!r}")
        call = self.prepare(prompts, **settings, **more)
        if output == "labels":
            return segment_labels(self, image, call, tile, t_start)
        predict, _ = self.image_predictor(image, call, tile, timings := {})  # timings: seconds per step
        probs = self.predict_finite(predict, call)  # [T,H,W]
        # 9–10. Average synonyms' scores into one map per class, threshold.
        return self.finish(probs, call, timings, t_start)

    def image_predictor(self, image, call: PreparedCall, tile, timings: dict, latents: dict | None = None):
        """Steps 3–8: (`predict(text)` → `[T,H,W]` for embeddings `text`, whole image or tiled; `(H, W)`); `latents`
        (a dict) keeps the image's latents between calls: prompts run in chunks encode the image once."""
        pixels = self._check_image(image)  # [1,3,H,W] in [-1,1]
        height, width = pixels.shape[-2:]
        tile_size = self._tile_size(tile, call.run.resolution, height, width)
        windows = transforms.tile_windows(height, width, tile_size, overlap=call.run.overlap) if tile_size else []

        def crop(top: int, left: int, h: int, w: int) -> torch.Tensor:
            return pixels[..., top : top + h, left : left + w]

        def predict(text) -> torch.Tensor:  # [T,H,W]
            more = dict(tile=tile_size, run=call.run, timings=timings, latents=latents)
            return blend_windows(self, crop, windows, (0, 0, height, width), text=text, **more)

        return predict, (height, width)

    def prepare(
        self,
        prompts: Sequence[Prompt],
        *,
        steps: int | None = None,
        ensemble: int | None = None,
        seed: int | None = None,
        resolution: int | None = None,
        threshold: float | Sequence[float] | None = None,
        overlap: float = 0.25,
        prompt_template: str | None = None,
        decoder: str = "auto",
        spread: bool = False,
        encoder: str = "auto",
    ) -> PreparedCall:
        """Steps 0–1 of a call: the checkpoint's defaults for what is None, the settings checked, the prompt texts
        (synonyms flattened) and the thresholds, once for an image or for every block of a large one."""
        # 0. Resolve defaults from the checkpoint config.
        cfg = self.config
        steps = cfg.default_steps if steps is None else steps
        ensemble = cfg.default_ensemble if ensemble is None else ensemble
        resolution = cfg.default_resolution if resolution is None else resolution
        seed = 0 if seed is None else seed
        # 1. Check the settings and prompts.
        self._check_settings(prompts, steps, ensemble, resolution)
        classes = [[p] if isinstance(p, str) else list(p) for p in prompts]
        _, thresholds = resolve_thresholds(
            [PromptClass(c[0], tuple(c)) for c in classes], cfg.default_threshold, threshold=threshold
        )
        texts = [self.format_prompt(s, prompt_template) for syns in classes for s in syns]
        sizes = [len(s) for s in classes]
        groups = tuple(sizes) if spread and ensemble > 1 else None  # then the members' variance per class too
        parts = dict(decoder=self.resolve_decoder(decoder), encoder=self.resolve_encoder(encoder))
        run = CallSettings(resolution, steps, ensemble, seed, overlap=overlap, groups=groups, **parts)
        return PreparedCall(run, classes, texts, thresholds)

    def predict_finite(self, predict, prepared: PreparedCall) -> torch.Tensor:
        """`predict(text)` with the prompts' embeddings (step 2: text encoder, cached per text); fp16 can overflow
        (SD VAEs are known to: NaN or black masks): then again with the part in fp32 (step 8)."""
        probs = predict(self.encode_prompts(prepared.texts))  # [T,H,W] (+ [K,H,W] variances with groups)
        while not bool(torch.isfinite(probs).all()):
            upcast_after_overflow(self)
            probs = predict(self.encode_prompts(prepared.texts))
        return probs

    def finish(self, probs: torch.Tensor, prepared: PreparedCall, timings: dict, t_start: float) -> SegmentationOutput:
        """Steps 9–10: `[T,H,W]` per text → synonyms' scores averaged into one map per class (the members'
        variances, when asked for, come per class already), thresholded."""
        sizes = [len(s) for s in prepared.classes]
        texts = len(prepared.texts)
        probs, variance = (probs[:texts], probs[texts:]) if prepared.run.groups else (probs, None)
        probs = class_means(probs, sizes)  # [K,H,W]
        labels, masks = probs_to_labels(probs, prepared.thresholds)
        timings["total"] = time.perf_counter() - t_start
        deviation = None if variance is None else variance.clamp_min(0).sqrt().cpu()  # [K,H,W]
        names = [c[0] for c in prepared.classes]
        maps = (probs.cpu(), labels.cpu(), masks.cpu())
        return SegmentationOutput(*maps, prepared.thresholds, names, timings, spread=deviation)

    def resolve_decoder(self, decoder: str) -> str:
        """`vae|fast|auto` → `vae` or `fast`; "auto" needs a fast decoder that passed its check (`fast_parts`)."""
        return resolve_part(self.model, self.config, "decoder", decoder)

    def resolve_encoder(self, encoder: str) -> str:
        """`vae|fast|auto` → `vae` or `fast`; "auto" needs a fast encoder that passed its check (`fast_parts`)."""
        return resolve_part(self.model, self.config, "encoder", encoder)

    def _check_settings(self, prompts, steps, ensemble, resolution) -> None:
        if not prompts or any(not (p if isinstance(p, str) else all(p)) for p in prompts):
            raise UsageError("`prompts` must be a non-empty list of non-empty class names")
        if self.config.objective == "one-step" and steps != 1:
            raise UsageError(
                f"this model was trained with the one-step objective and runs exactly 1 step (asked for {steps}): "
                "more steps make it worse (DESIGN §1.6); leave --steps out"
            )
        if not 1 <= steps <= 50:
            raise UsageError(f"`steps` must be between 1 and 50, got {steps}")
        if not 1 <= ensemble <= (8 if self.config.objective == "one-step" else 64):
            raise UsageError(
                f"`ensemble` must be between 1 and {8 if self.config.objective == 'one-step' else 64}, got {ensemble}"
            )
        if resolution < 0 or (resolution and resolution < self.model.size_multiple):
            raise UsageError(
                f"`resolution` must be 0 (native) or at least {self.model.size_multiple}, got {resolution}"
            )

    def _check_image(self, image) -> torch.Tensor:
        array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
        if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
            raise UsageError(f"`image` must be a PIL image or an HxWx3 uint8 array, got {array.dtype} {array.shape}")
        pixels = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None]  # [1,3,H,W] uint8
        return pixels.to(self.device, torch.float32) / 127.5 - 1  # [1,3,H,W] in [-1,1]

    def _tile_size(self, tile, resolution: int, height: int, width: int) -> int:
        # Tile at native scale when the image is much larger than the processing resolution.
        return transforms.tile_size_for(tile, resolution, height, width)

    def _predict(self, pixels, text, run: CallSettings, timings, seeds=None, latents=None) -> torch.Tensor:
        """Images `[n,3,H,W]` (one image, n equal-size tiles of one, or n equal-size images with their `seeds`)
        and `text` = (emb `[T,L,D]`, pooled `[T,D]`) → probabilities `[n,T,H,W]` at the input size, averaged over
        the ensemble; with `run.groups` (texts per class) followed by each class's variance across the members,
        `[n,T+K,H,W]` in all. Without `seeds` every row draws its noise from `run.seed`. `latents` (a dict, or
        None) keeps each member's image latents and noise for the next call on the same `pixels` (other texts)."""
        n, _, height, width = pixels.shape
        # 3. Preprocess: resize to the processing resolution, pad to the model's multiple.
        x = transforms.resize(pixels, transforms.processing_size(height, width, run.resolution))  # [n,3,h',w']
        generators = [torch.Generator("cpu").manual_seed(s) for s in (seeds or [run.seed])]
        total = torch.zeros((n, text[0].shape[0], height, width), device=self.device)
        mean = m2 = None  # Welford's running mean and squared deviations of each class's probability
        for member in range(run.ensemble):
            # A one-step model is deterministic: its ensemble averages flipped/rotated copies instead of seeds.
            k = member if self.config.objective == "one-step" else 0
            xk, pad = transforms.pad_to_multiple(transforms.dihedral(x, k), self.model.size_multiple)
            cached = None if latents is None else latents.setdefault(member, {})
            probs = self._predict_padded(xk, text, run, generators, timings, cached)  # [n,T,hp,wp]
            # 7. Undo the padding and the flip, resize to the input size (bilinear) before any threshold.
            probs = transforms.dihedral_inverse(transforms.unpad(probs, pad), k)  # [n,T,h',w']
            probs = transforms.resize(probs, (height, width))  # [n,T,H,W]
            total += probs
            if run.groups:
                per_class = torch.stack([c.mean(1) for c in probs.split(run.groups, dim=1)], 1)  # [n,K,H,W]
                if mean is None:
                    mean, m2 = per_class.clone(), torch.zeros_like(per_class)
                else:
                    delta = per_class - mean
                    mean += delta / (member + 1)
                    m2 += delta * (per_class - mean)
        total /= run.ensemble
        return total if m2 is None else torch.cat([total, m2 / run.ensemble], 1)

    def _predict_padded(self, x, text, run: CallSettings, generators, timings, cached=None) -> torch.Tensor:
        """Padded `[n,3,h,w]` → `[n,T,h,w]`: one encode per image, n·T U-Net passes per step and n·T decodes,
        `batch_size` (image, prompt) pairs per call; a diffusion model's noise from one generator for every row,
        or one per row (images with their own seeds); `cached` (a dict) keeps the latent and noise across calls."""
        emb, pooled = text
        n, texts = x.shape[0], emb.shape[0]
        # 4. Encode each image once (VAE encoder, or the distilled fast encoder); its latent is shared by every prompt.
        if cached:  # an earlier chunk of this call's prompts encoded it, and drew its noise
            z_img, noise, latent_shape = cached["z"], cached["noise"], cached["shape"]
        else:
            z_img, noise, latent_shape = self._encode(x, run, generators, timings)
            if cached is not None:
                cached.update(z=z_img, noise=noise, shape=latent_shape)
        out = []
        for lo in range(0, n * texts, self.batch_size):
            pairs = torch.arange(lo, min(lo + self.batch_size, n * texts), device=self.device)  # pair i·T+t
            image_of, text_of = pairs // texts, pairs % texts
            # One image's latent is a view for all its prompts (K of them: no K copies), else one row per pair.
            z_b = z_img.expand(len(pairs), -1, -1, -1) if n == 1 else z_img[image_of]  # [b,4,h,w]
            e, p = emb[text_of], pooled[text_of]  # [b,L,D], [b,D]
            b = z_b.shape[0]

            def denoise(z_t, t, z_b=z_b, e=e, p=p):  # this batch's inputs, bound now
                return self.model(z_b, z_t, t, e, p)

            # 5. Denoise (U-Net): one step from zeros, or DDIM with trailing spacing from seeded noise.
            t0 = time.perf_counter()
            if self.config.objective == "one-step":
                clean = diffusion.sample_one_step(
                    denoise, (b, *latent_shape[1:]), self.scheduler, self.device, self.dtype
                )
            else:
                start = noise[image_of] if noise.shape[0] > 1 else noise.expand(b, -1, -1, -1)  # [b,4,h,w]
                clean = diffusion.sample_ddim(denoise, start, self.scheduler, run.steps)
            t1 = time.perf_counter()
            # 6. Decode (VAE decoder, or the distilled fast decoder) → probabilities [b,h,w].
            decode = self.model.decode_probs_fast if run.decoder == "fast" else self.model.decode_probs
            out += [decode(part) for part in clean.split(self.decode_batch_size or b)]  # [≤b,h,w] each
            timings["denoise"] = timings.get("denoise", 0.0) + t1 - t0
            timings["decode"] = timings.get("decode", 0.0) + time.perf_counter() - t1
        return torch.cat(out).float().unflatten(0, (n, texts))  # [n,T,h,w]

    def _encode(self, x, run: CallSettings, generators, timings) -> tuple:
        """Padded `[n,3,h,w]` → (latent `[n,4,h/f,w/f]`, a diffusion model's noise `[1 or n,4,h/f,w/f]` or None,
        one latent's shape `(1,4,h/f,w/f)`)."""
        t0 = time.perf_counter()
        f = self.model.vae_scale_factor
        encode = self.model.encode_image_fast if run.encoder == "fast" else self.model.encode_image
        z_img = encode(x).to(self.dtype)  # [n,4,h/f,w/f]
        latent_shape = (1, z_img.shape[1], x.shape[-2] // f, x.shape[-1] // f)
        noise = None
        if self.config.objective == "diffusion":  # the same noise for every pair of an image: batched == one by one
            noise = torch.cat([torch.randn(latent_shape, generator=g) for g in generators])  # [1 or n,4,h/f,w/f]
            noise = noise.to(self.device, self.dtype)
        timings["encode"] = timings.get("encode", 0.0) + time.perf_counter() - t0
        return z_img, noise, latent_shape

    def _tiles_per_call(self, tile_h: int, tile_w: int, texts: int) -> int:
        """Equal-size tiles (or images, `batches.py`) per encode/U-Net/decode call: as many as `batch_size` (tile,
        prompt) pairs hold and, on a CPU, `PAIR_PIXELS_PER_CALL`; on a GPU `batch_size` (`auto`: free memory)."""
        if self.device.type == "cuda":
            return max(1, self.batch_size // texts)
        return max(1, min(self.batch_size // texts, PAIR_PIXELS_PER_CALL["cpu"] // (texts * tile_h * tile_w)))

    # -- persistence ---------------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write a checkpoint folder that `load_pipeline` reads back (weights saved in fp32)."""
        original = self.dtype
        self.model.to(torch.float32)
        try:
            return save_checkpoint(Path(path), self.loaded, overwrite=overwrite)
        finally:
            self.model.to(original)


def probs_to_labels(probs: torch.Tensor, thresholds: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """`[K,H,W]` → (labels `[H,W]`: the core label rule's prompted mode, k+1 where prompt k is the argmax and
    reaches its threshold, else 0; masks `[K,H,W]`: each prompt thresholded alone)."""
    masks = probs >= prompt_thresholds(thresholds, probs)  # [K,H,W]
    return labels_from_probs(probs, PROMPTED_MODE, thresholds), masks


def load_pipeline(
    name_or_path: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    cache_dir: str | Path | None = None,
    offline: bool | None = None,
    compile: bool = False,
) -> DigsegPipeline:
    """A pipeline from a checkpoint folder, an SD base (folder or Hub id), a compact config name or a
    registry name. `device` defaults to CPU and `dtype` to float32; pass `device="auto"` to pick one.
    `compile`: its parts through torch.compile (`inference.compiling`; a `UsageError` when it cannot run here)."""
    from digseg_cli.inference.device import resolve_device, resolve_dtype

    dev = resolve_device(device or "cpu")
    auto = "fp32" if dev.type != "cuda" else "auto"
    dt = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype or auto, dev)
    pipe = DigsegPipeline(load_model(name_or_path, cache_dir=cache_dir, offline=offline), dev, dt)
    return compile_pipeline(pipe) if compile else pipe
