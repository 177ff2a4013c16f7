"""rf-train finetune: the objective by hand, LoRA training, the guidance token, merge, resume, bad input."""

import json
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
from PIL import Image

from realfake.training.objective import distribution_matching, min_snr_weights, realfake_loss, snr

from conftest import VENV_BIN, rf


def test_min_snr_weights_by_hand():
    alphas_cumprod = torch.tensor([0.9, 0.5, 0.1])
    s = snr(alphas_cumprod, torch.tensor([0, 1, 2]))
    torch.testing.assert_close(s, torch.tensor([9.0, 1.0, 1 / 9]))
    torch.testing.assert_close(min_snr_weights(s, 5.0, "epsilon"), torch.tensor([5 / 9, 1.0, 1.0]))
    torch.testing.assert_close(
        min_snr_weights(s, 5.0, "v_prediction"), torch.tensor([5 / 10, 1 / 2, (1 / 9) / (10 / 9)])
    )
    with pytest.raises(ValueError, match="sample"):
        min_snr_weights(s, 5.0, "sample")


def test_distribution_matching_term_by_hand():
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    target = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    w = torch.tensor([1.0, 0.5])
    # sum_i w_i pred_i = [2.5, 4.0]; sum_i w_i target_i = [0.5, 1.0]; gap [2, 3]; mean of squares 6.5
    assert distribution_matching(pred, target, w).item() == pytest.approx(6.5)
    # the full loss: per-sample mse [1.0, 10.0] weighted by min-SNR [5/9, 1] -> (5/9 + 10) / 2
    s = torch.tensor([9.0, 1.0])
    total, denoise, dm = realfake_loss(pred, target, s, gamma=5.0, dm_weight=0.003)
    assert denoise.item() == pytest.approx((5 / 9 * 1.0 + 1.0 * 10.0) / 2)
    w_hand = torch.tensor([5 / 9, 1.0])
    assert dm.item() == pytest.approx(distribution_matching(pred, target, w_hand).item())
    assert total.item() == pytest.approx(denoise.item() + 0.003 * dm.item())


def make_real_set(root, classes=("cat", "dog", "bird"), per=6, size=40):
    rng = np.random.default_rng(0)
    colours = {"cat": (200, 60, 60), "dog": (60, 200, 60), "bird": (60, 60, 200)}
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per):
            img = np.clip(np.array(colours.get(c, (128, 128, 128))) + rng.integers(-30, 30, (size, size, 3)), 0, 255)
            Image.fromarray(img.astype(np.uint8)).save(root / c / f"{c}{i}.png")
    return root


@pytest.fixture(scope="module")
def real_set(tmp_path_factory):
    return make_real_set(tmp_path_factory.mktemp("real") / "train")


@pytest.fixture(scope="module")
def models(tiny_bundle):
    from realfake.training.finetune import load_models

    return load_models(tiny_bundle, with_image_encoder=True)


def test_training_lowers_the_loss_and_only_lora_changes(tiny_bundle, real_set):
    from realfake.core.classes import load_classes
    from realfake.training.data import FinetuneDataset, collect_samples
    from realfake.training.finetune import (
        FinetuneConfig,
        add_lora,
        conditioning,
        load_models,
        lora_parameters,
        training_step_loss,
    )

    m = load_models(tiny_bundle, with_image_encoder=False)
    add_lora(m.unet, rank=4, alpha=4)
    before = {k: v.detach().clone() for k, v in m.unet.state_dict().items()}
    samples = collect_samples(real_set, load_classes("cifar10"))[:4]
    data = FinetuneDataset(real_set, samples, 32)
    pixels = torch.stack([data.item(i, 0)["pixels"] for i in range(4)])
    context = conditioning(m, [s.prompt for s in samples], None)
    params = lora_parameters(m.unet)
    assert params and all("lora" in n for n, p in m.unet.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(params, lr=1e-2)
    cfg = FinetuneConfig(bundle=tiny_bundle, real=real_set, out=real_set, classes="cifar10")
    losses = []
    for _ in range(30):  # the same batch, noise and timesteps every step: the loss must go down
        loss, _, _ = training_step_loss(m, m.unet, pixels, context, torch.Generator().manual_seed(0), cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    after = m.unet.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora" in k for k in changed)


def test_guidance_token_reaches_the_unet(models):
    from realfake.training.finetune import conditioning

    prompts = ["photo of cat, best quality"] * 2
    a = torch.randn(2, 32, generator=torch.Generator().manual_seed(1))
    ctx_a, ctx_b = conditioning(models, prompts, a), conditioning(models, prompts, a + 1.0)
    plain = conditioning(models, prompts, None)
    assert torch.equal(ctx_a[:, :-1], plain[:, :-1]) and torch.equal(ctx_a[:, -1], a)
    sample = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([500, 500])
    with torch.no_grad():
        out_a = models.unet(sample, t, ctx_a).sample
        out_b = models.unet(sample, t, ctx_b).sample
    assert (out_a - out_b).abs().max() > 1e-4


def _finetune_args(bundle, data, out, *extra):
    return [
        "rf-train",
        "finetune",
        "--bundle",
        str(bundle),
        "--real",
        str(data),
        "--classes",
        "cifar10",
        "--out",
        str(out),
        "--batch-size",
        "4",
        "--lr",
        "1e-3",
        *extra,
    ]


@pytest.mark.slow
def test_finetune_resume_merge_and_lora_format(tiny_bundle, real_set, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    out = tmp_path / "run"
    args = _finetune_args(tiny_bundle, real_set, out, "--checkpoint-every", "10")
    proc = subprocess.Popen(
        [str(VENV_BIN / args[0]), *args[1:], "--max-steps", "100000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not list((out / "checkpoints").glob("step-*.pt")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed_from = max(int(p.stem.split("-")[1]) for p in (out / "checkpoints").glob("step-*.pt"))
    assert resumed_from >= 10
    rows_before = len((out / "metrics.jsonl").read_text().splitlines())
    r = rf(*args, "--max-steps", str(resumed_from + 6))
    assert r.returncode == 0, r.stderr
    assert f"resuming from checkpoint step-{resumed_from:07d}.pt (step {resumed_from})" in r.stderr
    assert "0 image embeddings computed, 18 from cache" in r.stderr  # not recomputed on resume
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[rows_before:] == list(range(resumed_from + 1, resumed_from + 7))
    summary = json.loads((out / "finetune.json").read_text())
    assert summary["steps"] == resumed_from + 6 and summary["guidance_token"] is True
    assert summary["processes"] == 1 and "finetune: 1 process(es) x 4 images = 4 per step" in r.stderr
    # the end always leaves a checkpoint (resumed_from + 6 is no multiple of 10): a finished run re-run with the
    # same settings does nothing; a longer one continues from the end, not from the last multiple of 10
    assert (out / "checkpoints" / f"step-{resumed_from + 6:07d}.pt").is_file()
    bundle_mtime = (out / "bundle" / "model_index.json").stat().st_mtime_ns
    again = rf(*args, "--max-steps", str(resumed_from + 6))
    assert again.returncode == 0 and f"finetune already complete: {resumed_from + 6} steps" in again.stderr
    assert len((out / "metrics.jsonl").read_text().splitlines()) == rows_before + 6
    assert (out / "bundle" / "model_index.json").stat().st_mtime_ns == bundle_mtime
    longer = rf(*args, "--max-steps", str(resumed_from + 7))
    assert longer.returncode == 0, longer.stderr[-2000:]
    assert f"resuming from checkpoint step-{resumed_from + 6:07d}.pt" in longer.stderr
    assert json.loads((out / "finetune.json").read_text())["steps"] == resumed_from + 7

    # the saved LoRA loads with diffusers, and the merged bundle equals base + LoRA at scale 0.5
    pipe = StableDiffusionPipeline.from_pretrained(tiny_bundle, local_files_only=True)
    pipe.load_lora_weights(out / "lora")
    merged = UNet2DConditionModel.from_pretrained(out / "bundle" / "unet", local_files_only=True)
    base = UNet2DConditionModel.from_pretrained(tiny_bundle / "unet", local_files_only=True)
    g = torch.Generator().manual_seed(0)
    sample, ctx, t = (
        torch.randn(2, 4, 16, 16, generator=g),
        torch.randn(2, 77, 32, generator=g),
        torch.tensor([10, 700]),
    )
    with torch.no_grad():
        with_lora = pipe.unet(sample, t, ctx, cross_attention_kwargs={"scale": 0.5}).sample
        fused = merged(sample, t, ctx).sample
        plain = base(sample, t, ctx).sample
    assert (fused - with_lora).abs().max() < 1e-4  # stated tolerance: fp32 fusion round-off
    assert (fused - plain).abs().max() > 1e-3  # and the LoRA really changed the UNet


@pytest.mark.slow
def test_finetune_bad_input(tiny_bundle, real_set, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = rf(*_finetune_args(tiny_bundle, empty, tmp_path / "o", "--max-steps", "1"))
    assert r.returncode == 2 and "holds no images" in r.stderr

    hollow = tmp_path / "hollow"
    shutil.copytree(real_set, hollow)
    (hollow / "frog").mkdir()
    r = rf(*_finetune_args(tiny_bundle, hollow, tmp_path / "o", "--max-steps", "1"))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: class folder {hollow / 'frog'} has no images"
    ]

    no_unet = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, no_unet)
    shutil.rmtree(no_unet / "unet")
    r = rf(*_finetune_args(no_unet, real_set, tmp_path / "o", "--max-steps", "1"))
    assert r.returncode == 2 and "missing component(s): unet" in r.stderr

    caps = tmp_path / "caps.jsonl"
    caps.write_text('{"image": "cat0", "caption": "a red cat"}\n{"image": "cat/ghost.png", "caption": "x"}\n')
    r = rf(*_finetune_args(tiny_bundle, real_set, tmp_path / "o", "--max-steps", "1", "--captions", str(caps)))
    assert r.returncode == 2 and "names 1 image(s) that do not exist" in r.stderr and "cat/ghost.png" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_precision_defaults():
    from realfake.core.errors import UserError
    from realfake.training.finetune import FinetuneConfig, resolve_precision

    assert FinetuneConfig.precision == "auto"
    assert resolve_precision("auto", cuda=False) == resolve_precision("bf16", cuda=False) == "fp32"  # fp32 on CPU
    assert resolve_precision("auto", cuda=True, bf16=True) == "bf16"
    assert resolve_precision("auto", cuda=True, bf16=False) == "fp16"
    assert resolve_precision("fp32", cuda=True, bf16=True) == "fp32"
    with pytest.raises(UserError, match="--precision must be one of auto, fp32, fp16, bf16"):
        FinetuneConfig(bundle=".", real=".", out=".", classes="cifar10", precision="fp8").validate()


def _lora_step(tiny_bundle, real_set, dtype=torch.float32, checkpointing=False):
    """One objective step on fresh models; returns (models, loss, {LoRA parameter name: gradient}, how often a
    UNet block ran forward)."""
    from realfake.core.classes import load_classes
    from realfake.training.data import FinetuneDataset, collect_samples
    from realfake.training.finetune import (
        FinetuneConfig,
        add_lora,
        conditioning,
        load_models,
        place_frozen,
        training_step_loss,
    )

    m = load_models(tiny_bundle, with_image_encoder=True)
    place_frozen(m, "cpu", dtype)
    torch.manual_seed(0)
    add_lora(m.unet, rank=4, alpha=4)
    if checkpointing:
        m.unet.enable_gradient_checkpointing()
    m.unet.train()
    runs = []
    block = m.unet.up_blocks[0].resnets[0]  # after LoRA layers, so backward needs its activations
    forward = block.forward

    def counted(*args, **kwargs):
        runs.append(1)
        return forward(*args, **kwargs)

    block.forward = counted
    samples = collect_samples(real_set, load_classes("cifar10"))[:2]
    data = FinetuneDataset(real_set, samples, 32)
    pixels = torch.stack([data.item(i, 0)["pixels"] for i in range(2)])
    cfg = FinetuneConfig(bundle=tiny_bundle, real=real_set, out=real_set, classes="cifar10")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        context = conditioning(m, [s.prompt for s in samples], torch.ones(2, 32))
        loss, _, _ = training_step_loss(m, m.unet, pixels, context, torch.Generator().manual_seed(0), cfg)
    loss.backward()
    return m, loss, {n: p.grad for n, p in m.unet.named_parameters() if p.requires_grad}, len(runs)


def test_mixed_precision_keeps_frozen_parts_in_half_and_lora_in_fp32(tiny_bundle, real_set):
    m, loss, grads, _ = _lora_step(tiny_bundle, real_set, dtype=torch.bfloat16)
    for module in (m.vae, m.text_encoder, m.image_encoder):
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
    frozen = {p.dtype for n, p in m.unet.named_parameters() if "lora" not in n}
    assert frozen == {torch.bfloat16}  # the UNet's base weights too
    assert grads and all("lora" in n for n in grads)
    assert all(g is not None and g.dtype == torch.float32 for g in grads.values())  # what the optimizer steps
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert any(g.abs().max() > 0 for g in grads.values())


def test_gradient_checkpointing_recomputes_and_gives_the_same_gradients(tiny_bundle, real_set):
    _, _, plain, runs = _lora_step(tiny_bundle, real_set)
    m, _, checkpointed, runs_checkpointed = _lora_step(tiny_bundle, real_set, checkpointing=True)
    assert m.unet.is_gradient_checkpointing
    assert (runs, runs_checkpointed) == (1, 2)  # the block's forward ran again in backward
    assert plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-4, atol=1e-6, msg=name)
