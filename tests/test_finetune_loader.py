"""The finetune's input pipeline: one permutation per epoch in the order the per-step code drew, each process's
share, workers that give the same batches as none, the run's length, the schedule, clipping, and exact resume."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_finetune import make_real_set

from realfake.core.errors import UserError
from realfake.training.finetune_loader import EpochOrder, StepBatches, resolve_length, step_loader


def _per_step_reference(n: int, per_step: int, micro_step: int, seed: int) -> list[int]:
    """The order as the finetune drew it before (a full permutation made again at every micro-step)."""
    start, out = micro_step * per_step, []
    while len(out) < per_step:
        epoch, offset = divmod(start + len(out), n)
        order = np.random.default_rng([seed, epoch]).permutation(n)
        take = min(per_step - len(out), n - offset)
        out.extend(int(i) for i in order[offset : offset + take])
    return out


@pytest.mark.parametrize("n, per_step", [(10, 4), (7, 3), (5, 8), (13, 13)])
def test_the_order_is_the_same_as_before_and_each_epoch_is_permuted_once(n, per_step):
    order = EpochOrder(n, seed=3)
    steps = 40
    assert [order.batch(per_step, m) for m in range(steps)] == [
        _per_step_reference(n, per_step, m, 3) for m in range(steps)
    ]
    epochs_touched = (steps * per_step - 1) // n + 1
    assert order.computed == epochs_touched  # before: one permutation per micro-step (40), at every n


def test_an_imagenet_sized_order_is_made_once_not_per_step():
    order = EpochOrder(1_281_167, seed=0)
    for m in range(50):
        order.batch(64, m)
    assert order.computed == 1


def test_each_process_takes_its_share_and_a_resumed_sampler_continues_the_same():
    full = [b for r in range(3) for b in StepBatches(20, 2, r, 3, seed=1, start=0, stop=12)]
    per_rank = [list(StepBatches(20, 2, r, 3, seed=1, start=0, stop=12)) for r in range(3)]
    order = EpochOrder(20, 1)
    for m in range(12):
        step = [i for r in range(3) for i, _ in per_rank[r][m]]
        assert step == order.batch(6, m)  # the ranks' shares are the global step, in order, none twice
        assert {salt for r in range(3) for _, salt in per_rank[r][m]} == {m}
    assert len(full) == 36
    assert list(StepBatches(20, 2, 1, 3, seed=1, start=5, stop=12)) == per_rank[1][5:]


def test_the_length_in_steps_or_epochs_says_the_images_seen():
    assert resolve_length(None, None, 1_281_167, 64) == (
        20_019,
        "length: 20,019 steps x 64 images = 1,281,216 images seen, 1.00 epochs of 1,281,167 "
        "(default: at least 1000 steps and one epoch)",
    )
    assert resolve_length(None, None, 200, 8)[0] == 1000  # a small set: the 1000-step floor
    steps, line = resolve_length(None, 2.5, 1000, 64)
    assert steps == 40 and "2,560 images seen, 2.56 epochs of 1,000 (--epochs 2.5)" in line
    assert resolve_length(7, None, 1000, 64)[0] == 7
    with pytest.raises(UserError, match="--max-steps and --epochs exclude each other"):
        resolve_length(7, 1.0, 1000, 64)


def test_loader_workers_give_the_batches_the_main_process_makes(tiny_bundle, tmp_path):
    from transformers import CLIPTokenizer

    from realfake.core.classes import load_classes
    from realfake.training.data import FinetuneDataset, collect_samples

    real = make_real_set(tmp_path / "real", per=4)
    samples = collect_samples(real, load_classes("cifar10"), log=lambda m: None)
    tokenizer = CLIPTokenizer.from_pretrained(tiny_bundle / "tokenizer")
    dataset = FinetuneDataset(real, samples, 32, seed=0, tokenizer=tokenizer)

    def batches(workers):
        return list(step_loader(dataset, StepBatches(len(samples), 3, 0, 1, 0, 0, 6), workers, pin_memory=False))

    inline, pooled = batches(0), batches(2)
    assert len(inline) == len(pooled) == 6
    for a, b in zip(inline, pooled, strict=True):
        assert a["indices"] == b["indices"] and a["prompts"] == b["prompts"]
        assert torch.equal(a["pixels"], b["pixels"]) and torch.equal(a["input_ids"], b["input_ids"])
        assert a["pixels"].shape == (3, 3, 32, 32) and a["input_ids"].shape == (3, tokenizer.model_max_length)
    assert not torch.equal(inline[0]["pixels"], inline[3]["pixels"])  # steps differ (salted augmentation)


def _run(tiny_bundle, real, out, **options):
    from realfake.training.finetune import run_finetune
    from realfake.training.finetune_config import FinetuneConfig

    cfg = FinetuneConfig(
        bundle=tiny_bundle, real=real, out=out, classes="cifar10", batch_size=2, checkpoint_every=2, **options
    )
    lines = []
    run_finetune(cfg, log=lines.append)
    return lines, [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_schedule_clipping_and_a_resume_that_equals_one_run(tiny_bundle, tmp_path):
    real = make_real_set(tmp_path / "real", per=3)
    warm = dict(lr_warmup_steps=2, lr=1e-3)
    lines, rows = _run(tiny_bundle, real, tmp_path / "one", max_steps=6, workers=2, **warm)
    assert any("2 loader worker(s) per process; length: 6 steps x 2 images = 12 images seen" in x for x in lines)
    assert [r["lr"] for r in rows] == pytest.approx([0.0, 5e-4, 1e-3, 1e-3, 1e-3, 1e-3])  # warmup, then constant
    assert all(r["grad_norm"] is not None and r["grad_norm"] > 0 for r in rows)  # clipped at 1.0 by default
    assert [r["images_seen"] for r in rows] == [2, 4, 6, 8, 10, 12]
    # 4 steps, then the same command with 6, and no loader workers: the same LoRA, exactly
    _run(tiny_bundle, real, tmp_path / "two", max_steps=4, workers=0, **warm)
    lines, _ = _run(tiny_bundle, real, tmp_path / "two", max_steps=6, workers=0, **warm)
    assert any("resuming from checkpoint step-0000004.pt (step 4)" in x for x in lines)
    weights = "lora/pytorch_lora_weights.safetensors"
    one, two = load_file(tmp_path / "one" / weights), load_file(tmp_path / "two" / weights)
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    # cosine over the run's length: lengthened from 4 to 6 steps, it continues on the 6-step curve (before the
    # fix the resumed step used the rate the 4-step run ended on: 0); no clipping asked here
    cosine = dict(warm, lr_schedule="cosine", max_grad_norm=0.0, workers=0)
    _, short = _run(tiny_bundle, real, tmp_path / "cos", max_steps=4, **cosine)
    _, longer = _run(tiny_bundle, real, tmp_path / "cos", max_steps=6, **cosine)
    assert [r["lr"] for r in short] == pytest.approx([0.0, 5e-4, 1e-3, 5e-4])
    assert [r["lr"] for r in longer[4:]] == pytest.approx([5e-4, 1e-3 * 0.5 * (1 + np.cos(0.75 * np.pi))])
    assert all(r["grad_norm"] is None for r in longer)
