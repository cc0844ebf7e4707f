"""Command line: `python -m fastvideo_nodes generate ...`, `... demo` and `... backends` (every attention
backend: usable here, or why not and how to install it).

Exit codes: 0 done, 2 a bad input (one `error:` line, no traceback), 130 Ctrl-C, 143 SIGTERM.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from .errors import FastVideoError
from .pipeline.options import WEIGHT_STORAGE, LoadOptions
from .pipeline.schedulers import SCHEDULERS, SPACINGS


class _Progress:
    """A one-line terminal progress bar as the sampler's callback; end_line() before any other output."""

    def __init__(self, prefix: str):
        self.prefix, self.start, self.open = prefix, time.perf_counter(), False

    def __call__(self, step, total, x0=None):
        width = 30
        done = int(width * step / total)
        rate = (time.perf_counter() - self.start) / step
        sys.stderr.write(f"\r{self.prefix} [{'#' * done}{'.' * (width - done)}] {step}/{total} {rate:.2f}s/step")
        self.open = True
        if step == total:
            self.end_line()
        sys.stderr.flush()

    def end_line(self):
        if self.open:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self.open = False


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that `finally:` blocks (gen.close()) still run."""


def _on_sigterm(signum, frame):
    raise _Terminated()


DEMO_OUTPUT = "fastvideo_demo.mp4"


def _add_generation_args(p: argparse.ArgumentParser, *, demo: bool = False) -> None:
    if not demo:
        p.add_argument("--model", required=True,
                       help="diffusers folder, or a Wan2.1 (T2V, I2V) or Wan2.2 TI2V-5B DiT .safetensors, "
                            "or Wan2.2 A14B's high-noise expert (with --low-noise-model)")
        p.add_argument("--text-encoder", help="UMT5 .safetensors (needed with a single-file model)")
        p.add_argument("--vae", help="Wan VAE .safetensors, 2.1 (2.2 for TI2V-5B); needed with a single-file model")
        p.add_argument("--image", default=None, metavar="FILE",
                       help="start image (PNG/JPEG/WebP): required by a Wan2.1 I2V model (with --image-encoder), "
                            "optional first frame of a Wan2.2 TI2V-5B; another aspect ratio: its middle is cut "
                            "to the video's, then resized to --width x --height")
        p.add_argument("--image-encoder", default=None, metavar="FILE",
                       help="CLIP vision .safetensors of an image-to-video model (clip_vision_h.safetensors)")
        p.add_argument("--low-noise-model", default=None, metavar="FILE",
                       help="Wan2.2 A14B: the low-noise expert (wan2.2_t2v_low_noise_14B_*.safetensors); --model is "
                            "then the high-noise one. A diffusers A14B folder brings its transformer_2/")
        p.add_argument("--boundary", type=float, default=None, metavar="F",
                       help="Wan2.2 A14B: the low-noise expert takes over below timestep F*1000 (default: the "
                            "folder's boundary_ratio, else 0.875)")
        p.add_argument("--guidance-scale-low", type=float, default=None, metavar="F",
                       help="Wan2.2 A14B: the low-noise expert's guidance (default 3.0 with --guidance-scale "
                            "unset (then 4.0), else equal to --guidance-scale)")
    p.add_argument("--prompt", default="A red fox trotting through fresh snow at dawn, cinematic" if demo else None,
                   required=not demo)
    p.add_argument("--negative-prompt", default=None, help="default: Wan 2.1's negative prompt")
    # None: the model's own (Wan2.1 480x832, 81 frames; Wan2.2 TI2V-5B 704x1280, 121 frames at 24 fps)
    p.add_argument("--height", type=int, default=128 if demo else None)
    p.add_argument("--width", type=int, default=192 if demo else None)
    p.add_argument("--num-frames", type=int, default=17 if demo else None)
    p.add_argument("--steps", type=int, default=8 if demo else 50)
    p.add_argument("--guidance-scale", type=float, default=None, help="default 5.0 (FastWan models: 1)")
    p.add_argument("--shift", type=float, default=None, help="flow shift (default 3.0; 5.0 at 720p)")
    p.add_argument("--scheduler", default=None, choices=list(SCHEDULERS),
                   help="default unipc (FastWan models: dmd); lcm or euler for few-step (distilled) models")
    p.add_argument("--spacing", default="default", choices=list(SPACINGS),
                   help="simple: ComfyUI's spacing, what 4-step distill LoRAs expect (euler/lcm)")
    p.add_argument("--sigmas", default=None, metavar="LIST",
                   help="explicit sigmas such as 1,0.9375,0.8333,0.625 (used as given, no shift; replaces --steps)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                   help="a LoRA .safetensors merged into the DiT (strength default 1.0); repeat to stack. "
                        "Wan2.2 A14B: into the high-noise expert (its _HIGH / _high_noise file)")
    if not demo:
        p.add_argument("--lora-low", action="append", default=[], metavar="FILE[:STRENGTH]",
                       help="Wan2.2 A14B: a LoRA merged into the low-noise expert (its _LOW / _low_noise file); "
                            "repeat to stack")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cfg-gate", type=float, default=1.0,
                   help="fraction of steps with the unconditional pass (1 = off)")
    p.add_argument("--teacache-threshold", type=float, default=0.0, help="0 = off; 0.08 is typical for 1.3B")
    p.add_argument("--teacache-mode", default="default", choices=["default", "ret"])
    p.add_argument("--attention-backend", default=None, help="auto, TORCH_SDPA, FLASH_ATTN, SAGE_ATTN, … "
                   "(`python -m fastvideo_nodes backends` lists which run here; auto on a FastWan model: "
                   "VIDEO_SPARSE_ATTN)")
    p.add_argument("--exact-attention-steps", type=int, default=0, metavar="N",
                   help="with an 8-bit attention backend: exact attention on the first and last N steps")
    p.add_argument("--sparsity", type=float, default=None,
                   help="VIDEO_SPARSE_ATTN (FastWan models): fraction of key tiles skipped, in [0, 1) (default 0.8)")
    p.add_argument("--device", default="cpu" if demo else None)
    p.add_argument("--precision", "--dtype", dest="precision", default=None, choices=["bf16", "fp16", "fp32"],
                   help="compute dtype (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--num-gpus", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="torch.compile the DiT blocks (GPU; warm-up on first run)")
    p.add_argument("--text-encoder-device", default=None, help="encode prompts here (e.g. cpu for small GPUs)")
    p.add_argument("--weight-storage", default="as_stored", choices=list(WEIGHT_STORAGE),
                   help="fp8: DiT and text-encoder linear weights stored as e4m3fn, half the memory; fp8_fast: "
                        "also fp8 tensor-core matmuls in the DiT (compute capability 8.9+)")
    p.add_argument("--fp8", dest="weight_storage", action="store_const", const="fp8",
                   help="same as --weight-storage fp8")
    p.add_argument("--fp8-fast", dest="weight_storage", action="store_const", const="fp8_fast",
                   help="same as --weight-storage fp8_fast")
    p.add_argument("--gpu-memory-gb", type=float, default=None,
                   help="GPU memory for the DiT; blocks beyond it stream from CPU memory (default: fit automatically)")
    p.add_argument("--fps", type=int, default=None, help="frames per second of the video (default the model's: "
                   "Wan 2.1 16, Wan 2.2 24)")
    p.add_argument("--output", default=DEMO_OUTPUT if demo else "output.mp4",
                   help="FILE.mp4 (or .mkv, .mov, .webm); written to a temporary file and renamed when complete")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output/--latents-out file "
                   "(refused by default" + ("; the demo always replaces its own fastvideo_demo.mp4)" if demo else ")"))
    p.add_argument("--latents-out", default=None, help="also save the raw VAE-space latents (key 'latents')")


def parse_lora(text: str, flag: str = "--lora") -> tuple[str, float]:
    """FILE[:STRENGTH] → (FILE, strength). A name that exists as given is a file even with a colon
    in it (C:\\loras\\x.safetensors); otherwise the text after the last colon is the strength.
    flag: the option named in errors (--lora or --lora-low)."""
    path, strength = text, 1.0
    if not os.path.exists(text) and ":" in text:
        path, _, tail = text.rpartition(":")
        try:
            strength = float(tail)
        except ValueError:
            raise FastVideoError(f"{flag} {text!r}: the strength after the colon must be a number "
                                 f"(FILE or FILE:0.8), got {tail!r}.") from None
        if not path:
            raise FastVideoError(f"{flag} {text!r}: no file name before the strength.")
    if strength != strength or strength in (float("inf"), float("-inf")):
        raise FastVideoError(f"{flag} {text!r}: the strength must be a finite number, got {strength}.")
    if not os.path.isfile(path):
        raise FastVideoError(f"{flag}: file not found: {path!r}.")
    return path, strength


def load_options(args):
    """The parsed load flags → LoadOptions (validated there, like the API's and the node's)."""
    return LoadOptions(device=args.device, precision=args.precision, weight_storage=args.weight_storage,
                       compile=args.compile, gpu_memory_gb=args.gpu_memory_gb,
                       text_encoder_device=args.text_encoder_device)


def _check_outputs(args) -> None:
    """Output problems are found before the model loads, not after the whole generation."""
    from .video import check_fps, check_output_path
    if args.command == "demo" and args.output == DEMO_OUTPUT:
        args.overwrite = True  # the demo's own file: running the demo twice must just work
    check_output_path(args.output, overwrite=args.overwrite, name="--output")
    if args.fps is not None:
        check_fps(args.fps)
    if args.latents_out:
        if not args.latents_out.endswith(".safetensors"):
            raise FastVideoError(f"--latents-out: {args.latents_out!r} must end in .safetensors.")
        if os.path.lexists(args.latents_out) and not args.overwrite:
            raise FastVideoError(f"--latents-out: {args.latents_out!r} already exists; choose another name or "
                                 "add --overwrite.")


def _generate(args, model, text_encoder, vae, progress: _Progress) -> int:
    from .pipeline.generator import VideoGenerator
    from .pipeline.inputs import parse_sigmas

    _check_outputs(args)
    from .attention import check_exact_steps
    check_exact_steps(args.exact_attention_steps, "--exact-attention-steps")  # before anything loads
    loras = [parse_lora(text) for text in args.lora]
    loras_low = [parse_lora(text, "--lora-low") for text in getattr(args, "lora_low", [])]
    sigmas = parse_sigmas(args.sigmas, "--sigmas")
    gen = VideoGenerator.from_pretrained(model, text_encoder=text_encoder, vae=vae, options=load_options(args),
                                         attention_backend=args.attention_backend, num_gpus=args.num_gpus,
                                         loras=loras, loras_low=loras_low,
                                         exact_attention_steps=args.exact_attention_steps,
                                         image_encoder=getattr(args, "image_encoder", None),
                                         low_noise_model=getattr(args, "low_noise_model", None))
    if args.sparsity is not None:
        from .attention.video_sparse import VideoSparseOptions
        gen = gen.with_attention_backend(args.attention_backend, VideoSparseOptions(args.sparsity),
                                         exact_steps=args.exact_attention_steps)
    try:
        result = gen.generate_video(
            args.prompt, negative_prompt=args.negative_prompt, height=args.height, width=args.width,
            num_frames=args.num_frames, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
            flow_shift=args.shift, scheduler=args.scheduler, seed=args.seed, sigmas=sigmas, spacing=args.spacing,
            cfg_gate=args.cfg_gate,
            teacache_threshold=args.teacache_threshold, teacache_mode=args.teacache_mode,
            output_path=args.output, callback=progress, fps=args.fps, overwrite=args.overwrite,
            image=getattr(args, "image", None), boundary=getattr(args, "boundary", None),
            guidance_scale_low=getattr(args, "guidance_scale_low", None))
    finally:
        gen.close()
    if args.latents_out:
        from safetensors.torch import save_file
        tmp = f"{args.latents_out}.part"
        save_file({"latents": result.latents.contiguous()}, tmp)
        os.replace(tmp, args.latents_out)
    t = result.timings
    print(f"wrote {args.output}: {result.frames.shape[0]} frames {result.frames.shape[2]}x{result.frames.shape[1]} "
          f"(encode {t['encode_s']:.1f}s" + (f", image {t['image_s']:.1f}s" if "image_s" in t else "")
          + f", sample {t['sample_s']:.1f}s, decode {t['decode_s']:.1f}s"
          + (f", LoRA merge {t['lora_s']:.1f}s" if loras or loras_low else "") + ")")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastvideo_nodes",
                                     description="Fast Wan2.1 text-to-video and image-to-video.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generation_args(sub.add_parser("generate", help="render a video from Wan2.1 model files"))
    _add_generation_args(sub.add_parser("demo", help="render a short mp4 with a tiny built-in random model (CPU)"),
                         demo=True)
    sub.add_parser("backends", help="list the attention backends: usable here, or why not and how to install")
    args = parser.parse_args(argv)
    if args.command == "backends":
        from .attention import describe_backends
        print("\n".join(describe_backends()))
        return 0
    progress = _Progress("sampling")
    # Only the main thread may install handlers; an embedding program keeps its own elsewhere.
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else False
    try:
        if args.command == "demo":
            from .testing.demo import demo_files
            files = demo_files()
            print("Demo: a tiny model with fixed RANDOM weights (no download). It draws noise-like video;\n"
                  "      the point is the whole path (encode → sample → decode → mp4) running on your machine.\n"
                  "      For real video point `generate` at Wan 2.1 files, e.g.\n"
                  "      python -m fastvideo_nodes generate --model wan2.1_t2v_1.3B_fp16.safetensors \\\n"
                  "          --text-encoder umt5_xxl_fp16.safetensors --vae wan_2.1_vae.safetensors --prompt '...'")
            return _generate(args, files["model"], files["text_encoder"], files["vae"], progress)
        return _generate(args, args.model, args.text_encoder, args.vae, progress)
    except FastVideoError as e:
        progress.end_line()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        progress.end_line()
        print("interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        progress.end_line()
        print("terminated (SIGTERM)", file=sys.stderr)
        return 143
    finally:
        if previous is not False:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
