"""The real-model path: HF checkpoints (a Qwen2 LLM with its tokenizer, a CLIP vision tower
with its image processor) and LLaVA-format data, all tiny and written by the test itself.
Nothing is downloaded: HF_HUB_OFFLINE=1 throughout."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: nothing from a hub

import numpy as np  # noqa: E402
import pytest
import torch
from conftest import tiny_grid

from tokenscale.config import GridError, TrialConfig, grid_to_dict, parse_grid
from tokenscale.workers import llava_data

torch.set_num_threads(1)

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 60, 230), "yellow": (240, 220, 30)}
QUESTION = "What color is the square?"
SPECIALS = ["<pad>", "<eos>", "<unk>"]


def _write_images(folder, n: int, seed: int) -> list[tuple[str, str]]:
    """n PNGs of a colored square on grey; returns (file name, color)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        color = list(COLORS)[i % len(COLORS)]
        pixels = np.full((40, 40, 3), 128, np.uint8)
        y, x = rng.integers(2, 18, 2)
        pixels[y : y + 20, x : x + 20] = COLORS[color]
        name = f"img{i:03d}.png"
        Image.fromarray(pixels).save(folder / name)
        out.append((name, color))
    return out


def _write_json(path, items: list[tuple[str, str]]) -> None:
    records = [
        {
            "id": f"{i}",
            "image": name,
            "conversations": [
                {"from": "human", "value": f"<image>\n{QUESTION}"},
                {"from": "gpt", "value": color},
                {"from": "human", "value": "Describe the image"},  # a later turn: ignored
                {"from": "gpt", "value": f"a {color} square"},
            ],
        }
        for i, (name, color) in enumerate(items)
    ]
    # a text-only conversation (no image): skipped
    records.append({"id": "text", "conversations": [{"from": "human", "value": "what"}, {"from": "gpt", "value": "red"}]})
    path.write_text(json.dumps(records))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny Qwen2 + tokenizer, a tiny CLIP tower + image processor, LLaVA-format data."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        PreTrainedTokenizerFast,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    root = tmp_path_factory.mktemp("real")
    llm_dir, vision_dir, data = root / "qwen-tiny", root / "clip-tiny", root / "data"

    # A byte-level BPE like Qwen's, trained here on the dataset's text (in a qwen2 folder
    # transformers v5 loads it as a Qwen2Tokenizer: the vocab and merges must be BPE's).
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    corpus = [QUESTION, "Describe the image", *COLORS, *(f"a {c} square" for c in COLORS)]
    backend.train_from_iterator(corpus * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    tokenizer.save_pretrained(llm_dir)
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=backend.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False,
    )
    Qwen2ForCausalLM(config).save_pretrained(llm_dir)

    vision = CLIPVisionConfig(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    CLIPVisionModel(vision).save_pretrained(vision_dir)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(vision_dir)

    train = _write_images(data / "images", 48, seed=1)
    _write_json(data / "train.json", train)
    held_out = _write_images(data / "eval_images", 64, seed=2)
    _write_json(data / "eval.json", held_out)
    _write_json(data / "eval_ocr.json", held_out[:8])
    return {
        "root": root, "llm": llm_dir, "vision": vision_dir, "data": data,
        "train": train, "eval": held_out,
    }


def llava_grid(assets, **data_overrides) -> dict:
    data = assets["data"]
    llava = {
        "train": str(data / "train.json"),
        "image_folder": str(data / "images"),
        "eval": [
            {"name": "colors", "task_family": "reasoning", "path": str(data / "eval.json"),
             "image_folder": str(data / "eval_images"), "chance": 0.25},
            {"name": "colors-ocr", "task_family": "ocr", "path": str(data / "eval_ocr.json"),
             "image_folder": str(data / "eval_images")},
        ],
        **data_overrides,
    }
    return tiny_grid(name="real", llms=1, visual_tokens=(4,)) | {
        "llms": [{"name": "qwen-tiny", "path": str(assets["llm"])}],
        "vision": {"path": str(assets["vision"]), "image_size": 32, "patch_size": 8},
        "data": {"llava": llava},
        "train": {"zero_stage": 1, "micro_batch": 16, "stage1_steps": 10, "stage2_steps": 100,
                  "stage1_lr": 3e-3, "stage2_lr": 3e-3, "bf16": "off"},
    }


def _trial(assets, **data_overrides) -> TrialConfig:
    return parse_grid(llava_grid(assets, **data_overrides)).trials()[0]


def test_loader_shapes_ids_and_round_trip(assets, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from PIL import Image
    from transformers import AutoImageProcessor, AutoTokenizer

    from tokenscale.workers.train import load_splits

    trial = _trial(assets)
    tokenizer = AutoTokenizer.from_pretrained(assets["llm"])
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    train, evals = load_splits(trial)
    assert len(train) == 1 and [s.benchmark.name for s in evals] == ["colors", "colors-ocr"]
    assert [s.benchmark.task_family for s in evals] == ["reasoning", "ocr"]
    assert [s.benchmark.chance for s in evals] == [0.25, 0.0]
    split = train[0]
    assert len(split) == 48, "the text-only example is skipped"
    assert split.images.shape == (48, 3, 32, 32) and split.images.dtype == np.float32
    assert split.questions.dtype == np.int64 and split.answers.dtype == np.int64
    assert (split.pad_id, split.eos_id) == (pad, eos)
    # the processor saved beside the vision checkpoint did the pixels
    processor = AutoImageProcessor.from_pretrained(assets["vision"])
    first = Image.open(assets["data"] / "images" / assets["train"][0][0]).convert("RGB")
    np.testing.assert_allclose(split.images[0], processor(images=[first], return_tensors="np")["pixel_values"][0], atol=1e-5)
    # the question is the first human turn, without <image>, left-padded to the common length
    question = tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
    assert split.questions.shape[1] >= len(question)
    for row in split.questions:
        assert row[-len(question) :].tolist() == question
        assert (row[: -len(question)] == pad).all()
    # the answer is the first gpt turn + <eos>: one word here, so [word, eos]
    for row, (_, color) in zip(split.answers, assets["train"], strict=True):
        assert row[-1] == eos
        ids = row[: row.tolist().index(eos)].tolist()
        assert tokenizer.decode(ids) == color
    for ev, items in zip(evals, (assets["eval"], assets["eval"][:8]), strict=True):
        assert len(ev) == len(items) and ev.questions.shape[1] == split.questions.shape[1]
        decoded = [tokenizer.decode(r[: r.tolist().index(eos)].tolist()) for r in ev.answers]
        assert decoded == [c for _, c in items]


def test_loader_pads_long_answers_with_eos_and_cuts(assets, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    records = json.loads((assets["data"] / "train.json").read_text())[:3]
    records[1]["conversations"][1]["value"] = "a red square"  # 3 words
    records[2]["conversations"][1]["value"] = "a red red red red square"  # cut
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(records))
    trial = _trial(assets, train=str(path), max_answer_tokens=4)
    (split,), _ = llava_data.load_splits(trial)
    tokenizer = AutoTokenizer.from_pretrained(assets["llm"])
    eos = tokenizer.eos_token_id
    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    color, three, long = ids(assets["train"][0][1]), ids("a red square"), ids("a red red red red square")
    assert len(color) == 1 and len(three) == 3 and len(long) > 4
    assert split.answers.tolist() == [color + [eos] * 3, three + [eos], long[:4]]


def test_image_preprocessing_without_a_processor(assets, tmp_path):
    """No preprocessor_config.json: the config's image_size and CLIP's mean/std; the tiny
    tower (no vision path): vision.image_size, pixels in [0, 1]."""
    import shutil

    from transformers.image_utils import OPENAI_CLIP_MEAN

    bare = tmp_path / "clip-bare"
    bare.mkdir()
    shutil.copy(assets["vision"] / "config.json", bare / "config.json")
    files = [str(assets["data"] / "images" / assets["train"][0][0])]
    trial = _trial(assets)
    pixels = llava_data.image_preprocessor(trial.vision.__class__(path=str(bare)))(files)
    assert pixels.shape == (1, 3, 32, 32)
    grey = (128 / 255 - OPENAI_CLIP_MEAN[0]) / 0.26862954
    assert pixels[0, 0, 0, 0] == pytest.approx(grey, abs=0.02)
    tiny = llava_data.image_preprocessor(trial.vision.__class__(image_size=16))(files)
    assert tiny.shape == (1, 3, 16, 16) and 0 <= tiny.min() and tiny.max() <= 1


def test_train_and_evaluate_on_checkpoints(assets, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENSCALE_CACHE", str(tmp_path / "cache"))
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    from tokenscale.costs import inference_flops
    from tokenscale.workers.train import single_process_group, train_and_evaluate

    single_process_group("gloo")
    trial = _trial(assets)
    assert TrialConfig.model_validate(trial.to_dict()) == trial  # what the worker receives
    metrics = train_and_evaluate(trial)
    llm = Qwen2ForCausalLM.from_pretrained(assets["llm"])
    embedding = {id(p) for p in (*llm.get_input_embeddings().parameters(), *llm.get_output_embeddings().parameters())}
    expected = sum(p.numel() for p in llm.parameters() if id(p) not in embedding)
    question = AutoTokenizer.from_pretrained(assets["llm"])(QUESTION, add_special_tokens=False)["input_ids"]
    rows = metrics["rows"]
    assert [r["benchmark"] for r in rows] == ["colors", "colors-ocr"]
    assert [r["task_family"] for r in rows] == ["reasoning", "ocr"]
    assert [r["n_examples"] for r in rows] == [64, 8]
    total = sum(p.numel() for p in llm.parameters())
    for row in rows:
        assert row["llm_params"] == total  # N: no `params` declared, so the counted total, embeddings included
        assert row["llm_params_non_embedding"] == expected
        assert row["inference_flops"] == pytest.approx(
            inference_flops(total, row["text_tokens_mean"], row["visual_tokens"], row["generated_tokens"], compressor="avgpool")
        )
        assert 0.0 <= row["score"] <= 1.0 and row["error"] == pytest.approx(1 - row["score"])
        assert row["text_tokens_mean"] == len(question)  # the left padding does not count
        assert row["generated_tokens"] == 2  # color + <eos>
        assert row["llm"] == "qwen-tiny" and row["visual_tokens"] == 4
    assert np.isfinite(metrics["stage2_loss"])
    # Learns the colour from the pixels: a one-sided exact binomial test against guessing
    # among 4 colours at alpha = 0.001 (64 answers: at least 28 correct; 40 steps gave 29,
    # 100 give 64). A label misaligned with its image would score chance and fail here.
    from tokenscale.workers.metrics import chance_floor

    correct = round(rows[0]["score"] * rows[0]["n_examples"])
    assert correct >= chance_floor(rows[0]["n_examples"], 0.25, alpha=0.001), rows[0]


def test_llava_data_from_s3(assets, s3_endpoint, monkeypatch, tmp_path):
    """JSON and images on s3:// are fetched through the Store into the local cache."""
    import boto3

    monkeypatch.setenv("TOKENSCALE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    data = assets["data"]
    s3.upload_file(str(data / "eval_ocr.json"), "tokenscale", "llava/eval.json")
    for name, _ in assets["eval"][:8]:
        s3.upload_file(str(data / "eval_images" / name), "tokenscale", f"llava/img/{name}")
    raw = llava_grid(assets)
    raw["data"]["llava"]["eval"] = [
        {"name": "s3-set", "task_family": "reasoning", "path": "s3://tokenscale/llava/eval.json",
         "image_folder": "s3://tokenscale/llava/img"}
    ]
    trial = parse_grid(raw).trials()[0]  # s3:// paths are not checked on the driver
    _, (split,) = llava_data.load_splits(trial)
    _, (local, _) = llava_data.load_splits(_trial(assets))
    assert len(split) == 8
    np.testing.assert_array_equal(split.answers, local.answers[:8])
    np.testing.assert_allclose(split.images, local.images[:8])
    assert (tmp_path / "cache" / "s3" / "tokenscale" / "llava" / "img").is_dir()


def _grid_error(raw) -> str:
    with pytest.raises(GridError) as err:
        parse_grid(raw)
    return str(err.value)


def test_grid_rejects_bad_llava_sections(assets, tmp_path):
    grid = parse_grid(llava_grid(assets))
    assert parse_grid(grid_to_dict(grid)) == grid  # what the driver saves beside the results

    raw = llava_grid(assets)
    raw["llms"] = [{"name": "tiny", "hidden_size": 16, "layers": 1, "heads": 2, "kv_heads": 1, "intermediate_size": 32}]
    assert "llms[0].path: data.llava is tokenized with the LLM's own tokenizer" in _grid_error(raw)

    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text((assets["llm"] / "config.json").read_text())
    raw = llava_grid(assets)
    raw["llms"] = [{"name": "q", "path": str(no_tokenizer)}]
    assert "llms[0].path" in (msg := _grid_error(raw)) and "no tokenizer" in msg

    missing = str(tmp_path / "nope.json")
    assert "data.llava.train: " in _grid_error(llava_grid(assets, train=missing))
    assert "data.llava.image_folder: " in _grid_error(llava_grid(assets, image_folder=str(tmp_path / "nodir")))
    raw = llava_grid(assets)
    raw["data"]["llava"]["eval"][1]["path"] = missing
    assert "data.llava.eval[1].path: " in _grid_error(raw)
    raw = llava_grid(assets)
    raw["data"]["llava"]["eval"][0]["image_folder"] = str(tmp_path / "nodir")
    assert "data.llava.eval[0].image_folder" in _grid_error(raw)
    raw = llava_grid(assets)
    raw["data"]["llava"]["eval"][0]["task_family"] = "counting"
    assert "data.llava.eval[0].task_family: unknown task_family 'counting'; choose 'reasoning' or 'ocr'" in _grid_error(raw)
    raw = llava_grid(assets)
    del raw["data"]["llava"]["eval"][0]["task_family"]
    assert "data.llava.eval[0].task_family: required" in _grid_error(raw)
    assert "data.llava.eval: expected a non-empty list" in _grid_error(llava_grid(assets, eval=[]))
    assert "data.llava.colour: unknown key" in _grid_error(llava_grid(assets, colour=1))
    raw = llava_grid(assets)
    raw["vision"]["patch_size"] = 4
    assert "vision.image_size/patch_size: 32/4, but the checkpoint" in _grid_error(raw)
    # s3:// data paths are left to the worker
    parse_grid(llava_grid(assets, train="s3://bucket/train.json", image_folder="s3://bucket/images"))


def test_config_hash_unchanged_without_llava():
    """A grid without data.llava keeps its result keys: the hash is pinned, so any change
    to the trial schema that moves every key (and re-runs every stored trial) shows here."""
    trial = parse_grid(tiny_grid()).trials()[0]
    assert trial.to_dict()["data"]["llava"] is None
    # moved on purpose once: global batches, per-stage ZeRO, the epoch-ordered data stream
    # and token_norm: auto change what a trial computes, so old results must not be reused
    assert trial.config_hash == "a363bcb0f6d30cc8"


def test_checkpoints_from_s3(assets, s3_endpoint, monkeypatch, tmp_path):
    """An s3:// LLM and vision tower (and the LLM's tokenizer) load like the local folders."""
    import boto3

    from tokenscale.config import LLMSpec
    from tokenscale.workers.model import CLIPTower, build_llm

    monkeypatch.setenv("TOKENSCALE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    for name in ("llm", "vision"):
        for file in assets[name].iterdir():
            s3.upload_file(str(file), "tokenscale", f"ckpt/{name}/{file.name}")
    remote = build_llm(LLMSpec(name="qwen-tiny", path="s3://tokenscale/ckpt/llm"), 0).state_dict()
    local = build_llm(LLMSpec(name="qwen-tiny", path=str(assets["llm"])), 0).state_dict()
    assert remote.keys() == local.keys() and all(torch.equal(remote[k], local[k]) for k in local)
    tower, local_tower = CLIPTower("s3://tokenscale/ckpt/vision"), CLIPTower(str(assets["vision"]))
    assert all(torch.equal(a, b) for a, b in zip(tower.state_dict().values(), local_tower.state_dict().values(), strict=True))
    _, pad, eos = llava_data.load_tokenizer("s3://tokenscale/ckpt/llm")
    assert (pad, eos) == llava_data.load_tokenizer(str(assets["llm"]))[1:]


def test_eval_sets_are_scored_on_generated_answers_by_their_metric(assets, tmp_path, monkeypatch):
    """An eval set declares its metric and prompt suffix: the suffix reaches the question's
    tokens, answers are generated greedily (KV cache) and scored as the benchmark does (here
    VQA accuracy over ten human answers)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENSCALE_CACHE", str(tmp_path / "cache"))
    import torch
    from transformers import AutoTokenizer

    from tokenscale.workers.metrics import score_set
    from tokenscale.workers.train import _batch, _build_model, encode_splits, evaluate, load_splits

    data = assets["data"]
    records = json.loads((data / "eval.json").read_text())[:-1]  # without the text-only record
    for i, record in enumerate(records):  # VQA's ten annotators
        color = record["conversations"][1]["value"]
        record["answers"] = [color] * (i % 5) + ["gray"] * (10 - i % 5)
    (tmp_path / "vqa.json").write_text(json.dumps(records))
    suffix = "Describe the image"  # words the tokenizer knows
    raw = llava_grid(assets, eval=[{
        "name": "colors-vqa", "task_family": "reasoning", "path": str(tmp_path / "vqa.json"),
        "image_folder": str(data / "eval_images"), "metric": "vqa", "prompt_suffix": suffix, "max_new_tokens": 3,
    }])
    trial = parse_grid(raw).trials()[0]
    train, (split,) = load_splits(trial)
    suffix_ids = AutoTokenizer.from_pretrained(assets["llm"])("\n" + suffix, add_special_tokens=False)["input_ids"]
    assert split.questions[0, -len(suffix_ids):].tolist() == suffix_ids, "the set's prompt suffix ends every question"
    assert split.metric == "vqa" and len(split.references[0]) == 10

    device, dtype = torch.device("cpu"), torch.float32
    model = _build_model(trial, device, dtype)
    _, (split,) = encode_splits(model, trial, train, [split])
    (score,) = evaluate(model, [split], device, dtype)
    images, questions, _, question_mask, _ = _batch(split, np.arange(len(split)), device, dtype)
    generated = model.generate(images, questions, question_mask, 3, split.eos_id).tolist()
    texts = [split.decode(ids[: ids.index(split.eos_id)] if split.eos_id in ids else ids) for ids in generated]
    expected, _ = score_set("vqa", texts, split.references)
    assert score.score == pytest.approx(expected)
    with_color = ["red"] * len(split)  # a model that always says the first color: VQA's 0.3 steps
    assert score_set("vqa", with_color, split.references)[0] != score_set("exact", with_color, split.references)[0]
    assert 1.0 <= score.generated_tokens_mean <= 3.0
