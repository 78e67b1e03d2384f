"""Train a subject hypernetwork end to end, then export what the ComfyUI nodes load.

    python -m training.train --preset demo                      # ~3 min on a CPU: pretrained toy-world model, synthetic subjects
    python -m training.train --preset tiny                      # ~1 min pipeline check on a tiny random backbone
    python -m training.train --config my.yaml --max-steps 5000  # your backbone, encoder and images
    accelerate launch -m training.train --config my.yaml        # several GPUs / nodes

Reads top to bottom: inputs (validated before any long work), model, loop, export.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from hypernet import HyperNetwork, save_hypernet
from hypernet.files import load_compact_subject_lora
from hypernet.subject import predict_subject_lora
from hypernet.targets import describe_mismatch, targets_hash

from .checkpoint import save_checkpoint, step_generator
from .config import TrainConfig, load_config, with_native_resolution
from .data import DataError
from .inputs import EncodedCache, SubjectBatches, open_backbone, open_dataset, open_eval_dataset, open_image_encoder, open_preview_dataset
from .objective import HypernetObjective
from .report import write_sample_grid
from .run_state import Interrupts, apply_optimizer_settings, check_output_dir, clear_run, read_metrics_lines, refuse, remove_leftovers
from .validation import make_validator, run_validation

log = logging.getLogger("training")


@dataclass
class TrainResult:
    hypernet_path: Path
    subject_lora_path: Path
    compact_lora_path: Path | None
    grid_path: Path | None
    metrics_path: Path
    final_step: int


def run(config: TrainConfig) -> TrainResult:
    with Interrupts() as interrupts:  # SIGINT and SIGTERM: a checkpoint of whole steps, then exit
        return _run(config, interrupts)


def _run(config: TrainConfig, interrupts: Interrupts) -> TrainResult:
    from accelerate import Accelerator

    config = with_native_resolution(config)
    # Without a GPU, say so explicitly: accelerate then sets up gloo when launched with several processes.
    on_cpu = not (torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()))
    accelerator = Accelerator(mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.grad_accum, cpu=on_cpu)
    main_process = accelerator.is_main_process
    output_dir = Path(config.output_dir)
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING, format="[%(name)s] %(message)s")
    resume_state = check_output_dir(config)  # refuses a silent overwrite, a missing checkpoint, settings fixed for the run
    if main_process:
        if config.overwrite:
            clear_run(output_dir)
        remove_leftovers(output_dir)
    accelerator.wait_for_everyone()

    # -- inputs, all validated before any long work
    with accelerator.main_process_first():  # the synthetic data set is written once
        dataset = open_dataset(config, output_dir)
        preview = open_preview_dataset(config, output_dir, dataset)
        evaluation = open_eval_dataset(config, output_dir)
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[config.mixed_precision]
    backbone = open_backbone(config, accelerator.device, weight_dtype)
    encoder = open_image_encoder(config, accelerator.device)
    if config.gradient_checkpointing:
        backbone.unet.enable_gradient_checkpointing()
        if config.text_encoder_targets:
            for text_encoder in backbone.text_encoders:
                text_encoder.gradient_checkpointing_enable()
    if main_process:
        print(f"training on {accelerator.num_processes} process(es), device {accelerator.device}, precision {config.mixed_precision}", flush=True)
    if main_process and config.backbone in ("tiny", "tiny-sdxl"):
        print(f"NOTE: the '{config.backbone}' backbone is small and randomly initialised (untrained): the sample pictures only show that the pipeline works.", flush=True)
    if main_process and config.backbone == "toy":
        print("NOTE: the 'toy' backbone is the toy-world model pretrained by experiments.pretrain (64 px, toys described by shape, "
              "colours, pattern and marking, in contexts): the samples show personalisation in that small world, not what SD1.5 does "
              "with photographs; docs/study.md measures how much of a subject's identity the predicted LoRA carries there.", flush=True)

    # -- model
    unet_targets, text_targets = backbone.targets(config.text_encoder_targets)
    layers = unet_targets.layers + (text_targets.layers if text_targets is not None else [])
    feature_spec = encoder.feature_spec(config.hidden_state)
    hyper_config = config.hypernet_config(feature_spec, backbone.text_encoder.get_input_embeddings().embedding_dim if config.token_embedding else 0)
    torch.manual_seed(config.seed)
    hypernet = HyperNetwork(hyper_config, layers)
    optimizer = torch.optim.AdamW(hypernet.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, config.warmup_steps)))
    start_step = 0
    if resume_state is not None:
        state = resume_state
        problem = describe_mismatch(json_layers(state["targets"]), layers)
        if problem or state["features"] != feature_spec.__dict__:
            refuse(f"--resume: the checkpoint was trained with another backbone or image encoder ({problem or 'image features differ'})")
        try:
            hypernet.load_state_dict(state["hypernet"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        except (RuntimeError, ValueError, KeyError) as error:
            refuse(f"--resume: the checkpoint does not fit this hypernetwork ({str(error).splitlines()[0]}); start over with --overwrite")
        apply_optimizer_settings(optimizer, scheduler, config)  # a new learning rate / weight decay takes effect
        start_step = state["step"]
        log.info("resumed from step %d", start_step)
    hypernet, optimizer, scheduler = accelerator.prepare(hypernet, optimizer, scheduler)
    schedule = backbone.noise_schedule()
    objective = HypernetObjective(backbone, unet_targets, text_targets, config, schedule, preopt=load_preopt(config, layers))
    cache = None
    if config.cache_latents or config.cache_features:
        cache = EncodedCache(dataset, backbone if config.cache_latents else None, encoder if config.cache_features else None, config)
    batches = SubjectBatches(dataset, encoder, config, accelerator.num_processes, accelerator.process_index, accelerator.device, cache)
    metrics_path = output_dir / "metrics.jsonl"
    validator = make_validator(config, evaluation, backbone, encoder, unet_targets, text_targets) if evaluation is not None and main_process else None
    board = open_tensorboard(config, output_dir) if main_process else None
    if main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
        truncate_metrics(metrics_path, start_step)

    # -- loop
    progress = make_progress(config, start_step, main_process)
    last_time, images_seen = time.perf_counter(), 0
    step = completed = start_step  # completed: the last step whose update (and metrics line) is done
    try:
        for step in range(start_step + 1, config.max_steps + 1):
            interrupts.hold()  # a signal now waits for the end of this step
            totals: dict[str, float] = {}
            for micro in range(config.grad_accum):
                index = (step - 1) * config.grad_accum + micro
                generator = step_generator(config.seed, index, accelerator.process_index)
                torch.manual_seed(generator.initial_seed())  # dropout etc. in the hypernetwork
                batch = batches.get(index, generator)
                with accelerator.accumulate(hypernet), accelerator.autocast(), objective.step(hypernet, batch, generator) as terms:
                    accelerator.backward(terms["loss"])
                    if accelerator.sync_gradients and config.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(hypernet.parameters(), config.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                for key, value in terms.items():
                    totals[key] = totals.get(key, 0.0) + float(value.detach()) / config.grad_accum
                images_seen += batch.pixels.shape[0] * accelerator.num_processes
            if not math.isfinite(totals["loss"]):
                raise FloatingPointError(f"loss became {totals['loss']} at step {step}; lower the learning rate or use bf16 instead of fp16")
            now = time.perf_counter()
            throughput = images_seen / max(now - last_time, 1e-9)
            if main_process:
                progress.update(1)
                progress.set_postfix(loss=f"{totals['loss']:.4f}", reg=f"{totals['reg']:.3g}", img_s=f"{throughput:.1f}")
                if step % config.log_every == 0 or step == config.max_steps:
                    write_metrics(metrics_path, {"step": step, **{k: round(v, 7) for k, v in totals.items()}, "lr": scheduler.get_last_lr()[0],
                                                 "images_per_s": round(throughput, 3)})
                    if board is not None:
                        for key, value in {**totals, "images_per_s": throughput}.items():
                            board.add_scalar(f"train/{key}", value, step)
                    last_time, images_seen = now, 0
            completed = step
            interrupts.release()  # raises a signal that came during the step
            if main_process:
                if config.checkpoint_every and step % config.checkpoint_every == 0:
                    save_training_state(output_dir, accelerator, hypernet, optimizer, scheduler, step, layers, feature_spec, config)
                if validator is not None and config.eval_every and step % config.eval_every == 0:
                    run_validation(validator, accelerator.unwrap_model(hypernet), step, metrics_path, board, output_dir)
                if config.sample_every and step % config.sample_every == 0:
                    write_sample_grid(output_dir / "samples" / f"step_{step:06d}.png", accelerator.unwrap_model(hypernet), backbone, encoder, preview,
                                      unet_targets, text_targets, config)
        if validator is not None and completed == config.max_steps and not (config.eval_every and completed % config.eval_every == 0):
            run_validation(validator, accelerator.unwrap_model(hypernet), completed, metrics_path, board, output_dir)  # the final scores
    except (KeyboardInterrupt, DataError) as stop:
        interrupts.hold()  # a second signal must not cut this save short
        if main_process:
            save_training_state(output_dir, accelerator, hypernet, optimizer, scheduler, completed, layers, feature_spec, config)
            why = f"data: {stop}" if isinstance(stop, DataError) else f"interrupted ({stop})"
            print(f"\n{why}: checkpoint at step {completed} in {output_dir}; continue with --resume", flush=True)
        interrupts.release(raise_pending=False)
        raise SystemExit(1 if isinstance(stop, DataError) else getattr(stop, "exit_code", 130))
    finally:
        progress.close()
        if board is not None:
            board.close()

    # -- export
    interrupts.where = "during the export; training finished and its checkpoint is saved: run the same command with --resume to export again"
    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(hypernet).eval()
    if not main_process:
        return None  # type: ignore[return-value]
    save_training_state(output_dir, accelerator, hypernet, optimizer, scheduler, completed, layers, feature_spec, config)
    provenance = {"trainer": "comfyui-subject-hypernet training.train", "steps": config.max_steps, "backbone": str(config.backbone),
                  "image_encoder": str(config.image_encoder), "data": str(config.data), "seed": config.seed,
                  **({"placeholder": config.placeholder} if config.token_embedding else {})}
    hypernet_path = save_hypernet(output_dir / "hypernet.safetensors", model.float().cpu(), base_arch=backbone.arch, provenance=provenance)
    model.to(accelerator.device)
    reference = dataset.reference_images(0)
    with torch.no_grad():
        features = encoder.features(reference, config.hidden_state)
    from hypernet.files import comfyui_install_hint, read_hypernet_info

    subject = predict_subject_lora(model, features, read_hypernet_info(hypernet_path))
    subject_path = subject.save(output_dir / "subject_lora.safetensors")
    compact_path = subject.save_compact(output_dir / "subject_lora.compact.safetensors") if subject.can_save_compact else None
    embedding_path = subject.save_embedding(output_dir / "subject_embedding.safetensors") if subject.embedding is not None else None
    grid_path = (write_sample_grid(output_dir / "samples" / "final.png", model, backbone, encoder, preview, unet_targets, text_targets, config)
                 if config.sample_subjects > 0 else None)
    print(f"\nexported hypernetwork: {hypernet_path}\nsubject LoRA (kohya):  {subject_path}\n"
          + (f"subject LoRA (compact, {compact_path.stat().st_size} bytes): {compact_path}\n" if compact_path else "")
          + (f"subject word embedding (textual inversion; the word {subject.placeholder!r} in prompts): {embedding_path}\n" if embedding_path else "")
          + (f"sample grid (reference | base | personalised | HM-CFG; {'held-out subjects, ' if preview is not dataset else ''}"
             f"prompt from another image of the subject): {grid_path}\n" if grid_path else "")
          + f"metrics: {metrics_path}\n{comfyui_install_hint(hypernet_path, backbone.arch)}", flush=True)
    return TrainResult(hypernet_path, subject_path, compact_path, grid_path, metrics_path, config.max_steps)


def open_tensorboard(config: TrainConfig, output_dir: Path):
    if not config.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise SystemExit("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(str(output_dir / "tensorboard"))


def json_layers(raw):
    from hypernet.targets import targets_from_json

    return targets_from_json(raw)


def save_training_state(output_dir, accelerator, hypernet, optimizer, scheduler, step, layers, feature_spec, config) -> None:
    from hypernet.targets import targets_to_json

    save_checkpoint(output_dir, {
        "hypernet": accelerator.unwrap_model(hypernet).state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "step": step, "targets": targets_to_json(layers), "targets_sha256": targets_hash(layers), "features": feature_spec.__dict__,
        "config": config.to_dict(),
    })


def load_preopt(config: TrainConfig, layers) -> dict:
    """Pre-optimised per-subject LiDB trainables, keyed by subject id (file stem)."""
    if not config.preopt_dir:
        return {}
    found = {}
    for path in sorted(Path(config.preopt_dir).glob("*.compact.safetensors")):
        trainables, basis, _ = load_compact_subject_lora(path)
        problem = describe_mismatch(layers, basis.layers)
        if problem:
            raise SystemExit(f"{path}: pre-optimised LoRA made for other layers ({problem})")
        found[path.name[: -len(".compact.safetensors")]] = trainables
    if not found:
        raise SystemExit(f"--preopt-dir {config.preopt_dir}: no *.compact.safetensors files (make them with python -m training.preoptimize)")
    return found


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines written after the checkpoint (the run re-does those steps), and a damaged
    line a killed run left (with a message)."""
    if not path.exists():
        return
    kept = [record for record in read_metrics_lines(path) if record["step"] <= step]
    path.write_text("".join(json.dumps(record) + "\n" for record in kept))


def write_metrics(path: Path, record: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def make_progress(config: TrainConfig, start: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=config.max_steps, initial=start, disable=not enabled, desc="training", unit="step", dynamic_ncols=True, file=sys.stdout)


def main(argv=None) -> None:
    try:
        run(load_config(argv))
    except KeyboardInterrupt as stop:  # outside the loop (which saves its own checkpoint)
        print(f"\ninterrupted {getattr(stop, 'where', '') or 'before training started'}", flush=True)
        raise SystemExit(getattr(stop, "exit_code", 130)) from None


if __name__ == "__main__":
    main()
