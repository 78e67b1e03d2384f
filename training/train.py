"""Train a subject hypernetwork end to end, then export what the ComfyUI nodes load.

    python -m training.train --preset demo                      # ~3 min on a CPU: pretrained toy-world model, synthetic subjects
    python -m training.train --preset tiny                      # ~1 min pipeline check on a tiny random backbone
    python -m training.train --config my.yaml --max-steps 5000  # your backbone, encoder and images
    accelerate launch -m training.train --config my.yaml        # several GPUs / nodes

Reads top to bottom (:func:`run`): build (inputs validated before any long work, the model), resume, prepare, loop,
export. Library code raises :mod:`training.errors`; :func:`main` turns them into a message and an exit status.
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
from .errors import InputError, RunRefused, TrainingError, TrainingStopped, exit_for
from .inputs import EncodedCache, SubjectBatches, open_backbone, open_dataset, open_eval_dataset, open_image_encoder, open_preview_dataset
from .objective import HyperNetObjective
from .report import write_sample_grid
from .run_state import Interrupts, apply_optimizer_settings, check_output_dir, clear_run, read_metrics_lines, remove_leftovers
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


@dataclass
class Job:
    """One run's pieces, made by :func:`build`; :func:`prepare` adds what the loop needs."""

    config: TrainConfig
    accelerator: object
    resume_state: dict | None
    dataset: object
    preview: object
    evaluation: object
    backbone: object
    encoder: object
    unet_targets: object
    text_targets: object
    feature_spec: object
    hypernet: object
    optimizer: object
    scheduler: object
    objective: object = None
    batches: object = None
    validator: object = None
    board: object = None

    @property
    def main_process(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)

    @property
    def metrics_path(self) -> Path:
        return self.output_dir / "metrics.jsonl"

    @property
    def layers(self) -> list:
        return self.unet_targets.layers + (self.text_targets.layers if self.text_targets is not None else [])

    def save_state(self, step: int) -> None:
        save_training_state(self.output_dir, self.accelerator, self.hypernet, self.optimizer, self.scheduler, step, self.layers,
                            self.feature_spec, self.config)


def learning_rate_factor(step: int, config) -> float:
    """The learning rate's share at ``step``: a linear warm-up over ``warmup_steps``, then constant or, with
    ``--lr-schedule cosine``, a half cosine down to 0 at ``max_steps``."""
    warm = min(1.0, (step + 1) / max(1, config.warmup_steps))
    if config.lr_schedule == "constant" or step < config.warmup_steps:
        return warm
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def run(config: TrainConfig) -> TrainResult:
    """Train and export. Raises :class:`~training.errors.TrainingError` (refused, bad input, stopped with a checkpoint)."""
    with Interrupts() as interrupts:  # SIGINT and SIGTERM: a checkpoint of whole steps, then TrainingStopped
        job = build(config)
        start_step = resume(job)
        prepare(job, start_step)
        completed = train_loop(job, start_step, interrupts)
        return export(job, completed, interrupts)


def build(config: TrainConfig) -> Job:
    """The output folder checked, every input opened and validated before any long work, a fresh hypernetwork."""
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
        announce(config, accelerator)

    unet_targets, text_targets = backbone.targets(config.text_encoder_targets)
    layers = unet_targets.layers + (text_targets.layers if text_targets is not None else [])
    feature_spec = encoder.feature_spec(config.hidden_state)
    hyper_config = config.hypernet_config(feature_spec, backbone.text_encoder.get_input_embeddings().embedding_dim if config.token_embedding else 0)
    torch.manual_seed(config.seed)
    hypernet = HyperNetwork(hyper_config, layers)
    optimizer = torch.optim.AdamW(hypernet.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate_factor(step, config))
    return Job(config, accelerator, resume_state, dataset, preview, evaluation, backbone, encoder, unet_targets, text_targets,
               feature_spec, hypernet, optimizer, scheduler)


def announce(config: TrainConfig, accelerator) -> None:
    print(f"training on {accelerator.num_processes} process(es), device {accelerator.device}, precision {config.mixed_precision}", flush=True)
    if config.backbone in ("tiny", "tiny-sdxl"):
        print(f"NOTE: the '{config.backbone}' backbone is small and randomly initialised (untrained): the sample pictures only show that the pipeline works.", flush=True)
    if config.backbone == "toy":
        print("NOTE: the 'toy' backbone is the toy-world model pretrained by experiments.pretrain (64 px, toys described by shape, "
              "colours, pattern and marking, in contexts): the samples show personalisation in that small world, not what SD1.5 does "
              "with photographs; docs/study.md measures how much of a subject's identity the predicted LoRA carries there.", flush=True)


def resume(job: Job) -> int:
    """With ``--resume``, the checkpoint's hypernetwork, optimizer and scheduler (this run's learning rate and weight
    decay applied) and the step it reached; 0 for a new run."""
    state = job.resume_state
    if state is None:
        return 0
    problem = describe_mismatch(json_layers(state["targets"]), job.layers)
    if problem or state["features"] != job.feature_spec.__dict__:
        raise RunRefused(f"--resume: the checkpoint was trained with another backbone or image encoder ({problem or 'image features differ'})")
    try:
        job.hypernet.load_state_dict(state["hypernet"])
        job.optimizer.load_state_dict(state["optimizer"])
        job.scheduler.load_state_dict(state["scheduler"])
    except (RuntimeError, ValueError, KeyError) as error:
        raise RunRefused(f"--resume: the checkpoint does not fit this hypernetwork ({str(error).splitlines()[0]}); start over with --overwrite") from None
    apply_optimizer_settings(job.optimizer, job.scheduler, job.config)  # a new learning rate / weight decay takes effect
    log.info("resumed from step %d", state["step"])
    return state["step"]


def prepare(job: Job, start_step: int) -> None:
    """accelerate takes the model; the objective, the batches, validation and the run's logs are set up."""
    config, accelerator, main_process = job.config, job.accelerator, job.main_process
    job.hypernet, job.optimizer, job.scheduler = accelerator.prepare(job.hypernet, job.optimizer, job.scheduler)
    job.objective = HyperNetObjective(job.backbone, job.unet_targets, job.text_targets, config, job.backbone.noise_schedule(),
                                      preopt=load_preopt(config, job.layers))
    cache = None
    if config.cache_latents or config.cache_features:
        cache = EncodedCache(job.dataset, job.backbone if config.cache_latents else None, job.encoder if config.cache_features else None, config)
    job.batches = SubjectBatches(job.dataset, job.encoder, config, accelerator.num_processes, accelerator.process_index, accelerator.device, cache)
    if job.evaluation is not None and main_process:
        job.validator = make_validator(config, job.evaluation, job.backbone, job.encoder, job.unet_targets, job.text_targets)
    job.board = open_tensorboard(config, job.output_dir) if main_process else None
    if main_process:
        job.output_dir.mkdir(parents=True, exist_ok=True)
        (job.output_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
        truncate_metrics(job.metrics_path, start_step)


def train_loop(job: Job, start_step: int, interrupts: Interrupts) -> int:
    """Steps ``start_step + 1 .. max_steps``; returns the last completed one. A signal or unreadable data saves a
    checkpoint of whole steps and raises :class:`TrainingStopped`."""
    config, main_process = job.config, job.main_process
    progress = make_progress(config, start_step, main_process)
    last_time, images_seen = time.perf_counter(), 0
    completed = start_step  # the last step whose update (and metrics line) is done
    try:
        for step in range(start_step + 1, config.max_steps + 1):
            interrupts.hold()  # a signal now waits for the end of this step
            totals, images = train_step(job, step)
            images_seen += images
            now = time.perf_counter()
            throughput = images_seen / max(now - last_time, 1e-9)
            if main_process:
                progress.update(1)
                progress.set_postfix(loss=f"{totals['loss']:.4f}", reg=f"{totals['reg']:.3g}", img_s=f"{throughput:.1f}")
                if step % config.log_every == 0 or step == config.max_steps:
                    log_metrics(job, step, totals, throughput)
                    last_time, images_seen = now, 0
            completed = step
            interrupts.release()  # raises a signal that came during the step
            if main_process:
                after_step(job, step)
        if job.validator is not None and completed == config.max_steps and not (config.eval_every and completed % config.eval_every == 0):
            run_validation(job.validator, job.accelerator.unwrap_model(job.hypernet), completed, job.metrics_path, job.board, job.output_dir)  # the final scores
    except (KeyboardInterrupt, DataError) as stop:
        interrupts.hold()  # a second signal must not cut this save short
        if main_process:
            job.save_state(completed)
        interrupts.release(raise_pending=False)
        why = f"data: {stop}" if isinstance(stop, DataError) else f"interrupted ({stop})"
        code = 1 if isinstance(stop, DataError) else getattr(stop, "exit_code", 130)
        message = f"{why}: checkpoint at step {completed} in {job.output_dir}; continue with --resume" if main_process else ""
        raise TrainingStopped(message, code) from None
    finally:
        progress.close()
        if job.board is not None:
            job.board.close()
    return completed


def train_step(job: Job, step: int) -> tuple[dict[str, float], int]:
    """One optimizer step (``grad_accum`` micro-batches): the mean loss terms and the images seen by all processes."""
    config, accelerator, hypernet = job.config, job.accelerator, job.hypernet
    totals: dict[str, float] = {}
    images = 0
    for micro in range(config.grad_accum):
        index = (step - 1) * config.grad_accum + micro
        generator = step_generator(config.seed, index, accelerator.process_index)
        torch.manual_seed(generator.initial_seed())  # dropout etc. in the hypernetwork
        batch = job.batches.get(index, generator)
        with accelerator.accumulate(hypernet), accelerator.autocast(), job.objective.step(hypernet, batch, generator) as terms:
            accelerator.backward(terms["loss"])
            if accelerator.sync_gradients and config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(hypernet.parameters(), config.max_grad_norm)
            job.optimizer.step()
            job.scheduler.step()
            job.optimizer.zero_grad(set_to_none=True)
        for key, value in terms.items():
            totals[key] = totals.get(key, 0.0) + float(value.detach()) / config.grad_accum
        images += batch.pixels.shape[0] * accelerator.num_processes
    if not math.isfinite(totals["loss"]):
        raise FloatingPointError(f"loss became {totals['loss']} at step {step}; lower the learning rate or use bf16 instead of fp16")
    return totals, images


def log_metrics(job: Job, step: int, totals: dict[str, float], throughput: float) -> None:
    write_metrics(job.metrics_path, {"step": step, **{k: round(v, 7) for k, v in totals.items()}, "lr": job.scheduler.get_last_lr()[0],
                                     "images_per_s": round(throughput, 3)})
    if job.board is not None:
        for key, value in {**totals, "images_per_s": throughput}.items():
            job.board.add_scalar(f"train/{key}", value, step)


def after_step(job: Job, step: int) -> None:
    """The periodic checkpoint, validation and sample grid (main process)."""
    config = job.config
    if config.checkpoint_every and step % config.checkpoint_every == 0:
        job.save_state(step)
    if job.validator is not None and config.eval_every and step % config.eval_every == 0:
        run_validation(job.validator, job.accelerator.unwrap_model(job.hypernet), step, job.metrics_path, job.board, job.output_dir)
    if config.sample_every and step % config.sample_every == 0:
        write_sample_grid(job.output_dir / "samples" / f"step_{step:06d}.png", job.accelerator.unwrap_model(job.hypernet), job.backbone,
                          job.encoder, job.preview, job.unet_targets, job.text_targets, config)


def export(job: Job, completed: int, interrupts: Interrupts) -> TrainResult:
    """The final checkpoint, the hypernetwork file, a subject LoRA of the first subject and a sample grid (main process)."""
    config, accelerator, output_dir = job.config, job.accelerator, job.output_dir
    interrupts.where = "during the export; training finished and its checkpoint is saved: run the same command with --resume to export again"
    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(job.hypernet).eval()
    if not job.main_process:
        return None  # type: ignore[return-value]
    job.save_state(completed)
    provenance = {"trainer": "comfyui-subject-hypernet training.train", "steps": config.max_steps, "backbone": str(config.backbone),
                  "image_encoder": str(config.image_encoder), "data": str(config.data), "seed": config.seed,
                  **({"placeholder": config.placeholder} if config.token_embedding else {})}
    hypernet_path = save_hypernet(output_dir / "hypernet.safetensors", model.float().cpu(), base_arch=job.backbone.arch, provenance=provenance)
    model.to(accelerator.device)
    reference = job.dataset.reference_images(0)
    with torch.no_grad():
        features = job.encoder.features(reference, config.hidden_state)
    from hypernet.files import comfyui_install_hint, read_hypernet_info

    subject = predict_subject_lora(model, features, read_hypernet_info(hypernet_path))
    subject_path = subject.save(output_dir / "subject_lora.safetensors")
    compact_path = subject.save_compact(output_dir / "subject_lora.compact.safetensors") if subject.can_save_compact else None
    embedding_path = subject.save_embedding(output_dir / "subject_embedding.safetensors") if subject.embedding is not None else None
    grid_path = (write_sample_grid(output_dir / "samples" / "final.png", model, job.backbone, job.encoder, job.preview, job.unet_targets,
                                   job.text_targets, config)
                 if config.sample_subjects > 0 else None)
    preview = job.preview
    print(f"\nexported hypernetwork: {hypernet_path}\nsubject LoRA (kohya):  {subject_path}\n"
          + (f"subject LoRA (compact, {compact_path.stat().st_size} bytes): {compact_path}\n" if compact_path else "")
          + (f"subject word embedding (textual inversion; the word {subject.placeholder!r} in prompts): {embedding_path}\n" if embedding_path else "")
          + (f"sample grid (reference | base | personalised | HM-CFG; {'held-out subjects, ' if preview is not job.dataset else ''}"
             f"prompt from another image of the subject): {grid_path}\n" if grid_path else "")
          + f"metrics: {job.metrics_path}\n{comfyui_install_hint(hypernet_path, job.backbone.arch)}", flush=True)
    return TrainResult(hypernet_path, subject_path, compact_path, grid_path, job.metrics_path, config.max_steps)


def open_tensorboard(config: TrainConfig, output_dir: Path):
    if not config.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise InputError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
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
            raise InputError(f"{path}: pre-optimised LoRA made for other layers ({problem})")
        found[path.name[: -len(".compact.safetensors")]] = trainables
    if not found:
        raise InputError(f"--preopt-dir {config.preopt_dir}: no *.compact.safetensors files (make them with python -m training.preoptimize)")
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
    except TrainingError as error:
        raise exit_for(error) from None
    except KeyboardInterrupt as stop:  # outside the loop (which saves its own checkpoint)
        print(f"\ninterrupted {getattr(stop, 'where', '') or 'before training started'}", flush=True)
        raise SystemExit(getattr(stop, "exit_code", 130)) from None


if __name__ == "__main__":
    main()
