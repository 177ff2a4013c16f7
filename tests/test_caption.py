"""rf-train caption: a tiny random-weight BLIP-2 (real CLIP BPE tokenizer, built offline) captions an ImageFolder;
the JSONL contract, resume after a crash mid-run, the captioner record, bad input, and the captions reaching
finetuning and generation prompts."""

from __future__ import annotations

import json
import shutil
import time
import warnings

import numpy as np
import pytest
from PIL import Image

from realfake.training.caption import CaptionConfig, Captioner, record_path, run_caption

from conftest import rf


def build_tiny_blip2(out, seed: int = 0):
    """A BLIP-2 (ViT + Q-Former + OPT) with widths of 32 and one layer each, saved with its processor."""
    import torch
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        BlipImageProcessor,
        OPTConfig,
    )

    from realfake.export.tiny_bundle import clip_tokenizer

    tok = clip_tokenizer()
    tok.add_tokens(["<image>"], special_tokens=True)
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4}
    text = OPTConfig(
        vocab_size=len(tok),
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        word_embed_proj_dim=32,
        max_position_embeddings=128,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    config = Blip2Config(
        vision_config=Blip2VisionConfig(**small, image_size=32, patch_size=8).to_dict(),
        qformer_config=Blip2QFormerConfig(**small, encoder_hidden_size=32, vocab_size=100).to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=4,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    processor = Blip2Processor(BlipImageProcessor(size={"height": 32, "width": 32}), tok, num_query_tokens=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Blip2ForConditionalGeneration(config).save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def blip2(tmp_path_factory):
    return build_tiny_blip2(tmp_path_factory.mktemp("captioner") / "blip2")


def make_folder(root, classes=("cat", "dog", "bird"), per=4, size=40):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per):
            Image.fromarray(rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8)).save(root / c / f"{c}{i}.png")
    return root


@pytest.fixture
def real(tmp_path):
    return make_folder(tmp_path / "real")


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_captions_resume_after_a_crash_without_duplicates(blip2, real, tmp_path, monkeypatch):
    ref = tmp_path / "ref.jsonl"
    summary = run_caption(CaptionConfig(real, blip2, ref, batch_size=5, max_new_tokens=6), log=lambda m: None)
    expected = rows(ref)
    # the JSONL contract: one object a line, the image's path relative to the folder, a caption
    assert [r["image"] for r in expected] == [f"{c}/{c}{i}.png" for c in ("bird", "cat", "dog") for i in range(4)]
    assert all(set(r) == {"image", "caption"} and r["caption"] for r in expected)
    assert summary["new"] == 12 and summary["images_per_sec"] > 0

    # a crash in the second batch: the first batch is on disk, nothing else
    out = tmp_path / "caps.jsonl"
    calls = []
    caption = Captioner.caption

    def crash_on_second(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected crash")
        return caption(self, *args, **kwargs)

    monkeypatch.setattr(Captioner, "caption", crash_on_second)
    cfg = CaptionConfig(real, blip2, out, batch_size=5, max_new_tokens=6)
    with pytest.raises(RuntimeError, match="injected"):
        run_caption(cfg, log=lambda m: None)
    assert rows(out) == expected[:5]
    monkeypatch.undo()
    # a torn half line, as a crash mid-write leaves, is cut off; the re-run captions only what is missing
    with open(out, "a") as f:
        f.write('{"image": "cat/ca')
    logs = []
    summary = run_caption(cfg, log=logs.append)
    assert "12 images in" in logs[0] and "5 already captioned, 7 to do" in logs[0]
    assert summary["new"] == 7 and summary["captioned"] == 12
    assert rows(out) == expected  # greedy decoding: the resumed file is the uninterrupted one
    # nothing left: a third run adds nothing
    assert run_caption(cfg, log=lambda m: None)["new"] == 0 and rows(out) == expected
    assert json.loads(record_path(out).read_text())["last_run"]["new"] == 0


def test_prompt_and_length(blip2, real, tmp_path):
    out = tmp_path / "p.jsonl"
    run_caption(CaptionConfig(real, blip2, out, prompt="a photo of", max_new_tokens=3), log=lambda m: None)
    caps = [r["caption"] for r in rows(out)]
    assert all(c.startswith("a photo of ") for c in caps)
    # at most 3 new tokens after the prompt
    captioner = Captioner(blip2)
    tok = captioner.processor.tokenizer
    assert max(len(tok(c.removeprefix("a photo of"), add_special_tokens=False).input_ids) for c in caps) <= 3


def test_refuses_another_captioners_file(blip2, real, tmp_path):
    out = tmp_path / "caps.jsonl"
    run_caption(CaptionConfig(real, blip2, out, max_new_tokens=2), log=lambda m: None)
    other = build_tiny_blip2(tmp_path / "other", seed=1)  # same shapes and sizes, other weights
    before = out.read_bytes()
    with pytest.raises(Exception, match="was written by another captioner"):
        run_caption(CaptionConfig(real, other, out, max_new_tokens=2), log=lambda m: None)
    with pytest.raises(Exception, match="was written with max_new_tokens=2"):
        run_caption(CaptionConfig(real, blip2, out, max_new_tokens=5), log=lambda m: None)
    assert out.read_bytes() == before
    # a copy of the same captioner elsewhere is the same captioner
    copy = shutil.copytree(blip2, tmp_path / "copy")
    assert run_caption(CaptionConfig(real, copy, out, max_new_tokens=2), log=lambda m: None)["new"] == 0


def test_undecodable_images_are_skipped_and_named(blip2, real, tmp_path):
    (real / "cat" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "caps.jsonl"
    logs = []
    summary = run_caption(CaptionConfig(real, blip2, out, batch_size=4, max_new_tokens=2), log=logs.append)
    assert summary["unreadable"] == ["cat/broken.png"] and summary["new"] == 12
    assert "cat/broken.png" not in {r["image"] for r in rows(out)}
    assert any("1 image(s) did not decode" in m and "cat/broken.png" in m for m in logs)


def test_cli_bad_input_is_one_line(blip2, real, tmp_path):
    """One process runs the command three times: a good run, a model without weights, another's file."""
    out = tmp_path / "caps.jsonl"
    args = ["rf-train", "caption", "--real", str(real), "--out", str(out), "--max-new-tokens", "2"]
    t0 = time.perf_counter()
    r = rf(*args, "--model", str(blip2), "--classes", "cifar10")
    assert r.returncode == 0, r.stderr
    assert "captioned 12 images" in r.stderr and "images/sec" in r.stderr
    print(f"rf-train caption, 12 images: {time.perf_counter() - t0:.1f} s with start-up; {r.stderr.splitlines()[-1]}")

    hollow = shutil.copytree(blip2, tmp_path / "hollow")
    for f in hollow.glob("*.safetensors"):
        f.unlink()
    r = rf(*args, "--model", str(hollow))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: captioner {hollow} has no weights (*.safetensors or *.bin)"
    ]
    r = rf(*args, "--model", str(blip2), "--classes", "cifar100")  # folders named after no class of the set
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(f"error: --data {real}: folder(s) ")
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text('{"image": "cat/cat0.png", "caption": "hand-written"}\n')
    r = rf("rf-train", "caption", "--real", str(real), "--out", str(foreign), "--model", str(blip2))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "was not written by rf-train caption" in r.stderr


def test_captions_reach_finetune_and_generation_prompts(blip2, real, tmp_path, tiny_bundle):
    """The file feeds `rf-train finetune --captions` (one real step) and `rf-client generate --captions` (the
    work items' prompts), untouched."""
    from realfake.client.generate import GenerateConfig, build_job, read_inputs
    from realfake.client.triton import ModelCard
    from realfake.core.classes import load_classes
    from realfake.training.data import collect_samples
    from realfake.training.finetune import FinetuneConfig, run_finetune

    caps = tmp_path / "caps.jsonl"
    run_caption(CaptionConfig(real, blip2, caps, prompt="a photo of", max_new_tokens=4), log=lambda m: None)
    by_image = {r["image"]: r["caption"] for r in rows(caps)}

    samples = collect_samples(real, load_classes("cifar10"), caps)
    assert len(samples) == 12
    for s in samples:
        assert s.prompt == f"photo of {s.cls.name}, {by_image[s.relpath]}, best quality"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = run_finetune(
            FinetuneConfig(
                bundle=tiny_bundle,
                real=real,
                out=tmp_path / "ft",
                classes="cifar10",
                captions=caps,
                max_steps=1,
                batch_size=4,
                checkpoint_every=1,
            ),
            log=lambda m: None,
        )
    assert (tmp_path / "ft" / "bundle" / "unet").is_dir() and result

    cfg = GenerateConfig(classes="cifar10", out=tmp_path / "gen", real=real, captions=caps)
    card = ModelCard("127.0.0.1:1", "tiny", 32, True, 4)
    _, items = build_job(cfg, read_inputs(cfg), card, log=lambda m: None)
    assert len(items) == 12
    for item in items:
        assert item.caption == by_image[item.real_image]
        assert item.prompt == f"photo of {item.cls.name}, {item.caption}, best quality"


def test_two_processes_one_killed_then_rerun_caption_every_image_once(blip2, tmp_path):
    """`--shard I/N` over two processes: each writes its own part; one is SIGKILLed mid-way and re-run; the last to
    finish merges the parts into OUT with every image once, the captions of an unsplit run."""
    import os
    import signal
    import subprocess

    from conftest import VENV_BIN

    real = make_folder(tmp_path / "real", per=16)  # 48 images, 24 per process, batch 1
    ref = tmp_path / "ref.jsonl"
    run_caption(CaptionConfig(real, blip2, ref, batch_size=1, max_new_tokens=4), log=lambda m: None)
    expected = {r["image"]: r["caption"] for r in rows(ref)}
    out = tmp_path / "caps.jsonl"

    def argv(k):
        return [str(VENV_BIN / "rf-train"), "caption", "--real", str(real), "--model", str(blip2), "--out", str(out),
                "--batch-size", "1", "--max-new-tokens", "4", "--shard", f"{k}/2"]  # fmt: skip

    env = {**os.environ, "RF_PROGRESS_EVERY": "0"}
    victim = subprocess.Popen(argv(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    part1 = out.with_name(out.name + ".part-00001-of-00002")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not part1.exists() or part1.read_text().count("\n") < 3):
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = part1.read_text().count("\n")
    assert 3 <= killed_at < 24, f"the process was not killed mid-way ({killed_at} of 24 written)"
    first = rf("rf-train", *argv(0)[1:], env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "still being captioned" in first.stderr and not out.exists()  # process 1 has not finished
    assert "caption 0/2:" in first.stderr  # the plain progress lines of a log without a terminal
    second = rf("rf-train", *argv(1)[1:], env=env)
    assert second.returncode == 0, second.stderr[-2000:]
    assert f"{killed_at} already captioned, {24 - killed_at} to do" in second.stderr
    assert "merged 2 part(s)" in second.stderr
    merged = rows(out)
    assert [r["image"] for r in merged] == list(expected)  # every image once, in the folder's order
    assert {r["image"]: r["caption"] for r in merged} == expected
    assert not list(tmp_path.glob("caps.jsonl.part-*"))  # the parts are folded in and gone
    # finetune and generate read the merged file as any captions file
    again = rf("rf-train", *argv(0)[1:], env=env)
    assert again.returncode == 0 and "0 to do" in again.stderr and rows(out) == merged
    assert not list(tmp_path.glob("caps.jsonl.part-*"))  # a re-run after the merge leaves no part behind
