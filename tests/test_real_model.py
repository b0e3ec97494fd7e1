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
from conftest import final_metrics, tiny_grid, worker_env

from tokenscale.config import GridError, TrialConfig, grid_to_dict, parse_grid
from tokenscale.workers import llava_data

torch.set_num_threads(1)

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 60, 230), "yellow": (240, 220, 30)}
QUESTION = "What color is the square?"
SPECIALS = ["<pad>", "<eos>", "<unk>", "<|im_start|>", "<|im_end|>"]
# Qwen-1.5-chat's template (ChatML with its default system prompt)
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


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
                {"from": "human", "value": "Describe the image"},  # a later turn: trained on its answer
                {"from": "gpt", "value": f"a {color} square"},
            ],
        }
        for i, (name, color) in enumerate(items)
    ]
    # a text-only conversation (no image): trained as text, never an eval example
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
    # the same LLM as a chat checkpoint: ChatML, <|im_end|> ends a turn (and generation)
    chat_dir = root / "qwen-tiny-chat"
    chat = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<pad>", unk_token="<unk>")
    chat.chat_template = CHATML
    chat.save_pretrained(chat_dir)
    Qwen2ForCausalLM.from_pretrained(llm_dir).save_pretrained(chat_dir)

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
        "root": root, "llm": llm_dir, "chat_llm": chat_dir, "vision": vision_dir, "data": data,
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


def _decode(tokenizer, ids) -> str:
    return tokenizer.decode([int(i) for i in ids])


def test_loader_streams_stages_and_eval_sets(assets, monkeypatch, tmp_path):
    """Stage 1 (plain: the image, then the caption), stage 2 (no chat template: the question,
    then every gpt turn + <eos> in the loss, the later human turn out of it), eval sets
    (prompt only, image records only); pixels through the checkpoint's processor."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENSCALE_CACHE", str(tmp_path / "cache"))
    from PIL import Image
    from transformers import AutoImageProcessor, AutoTokenizer

    from tokenscale.workers.train import load_splits

    trial = _trial(assets, image_aspect="crop")
    tokenizer = AutoTokenizer.from_pretrained(assets["llm"])
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    (stage1, stage2), evals = load_splits(trial)
    assert [s.benchmark.name for s in evals] == ["colors", "colors-ocr"]
    assert [s.benchmark.task_family for s in evals] == ["reasoning", "ocr"]
    assert [s.benchmark.chance for s in evals] == [0.25, 0.0]
    assert len(stage1) == len(stage2) == 49, "48 image records and the text-only one"
    assert [len(e) for e in evals] == [64, 8], "an eval set keeps its image records only"
    assert (stage2.pad_id, stage2.eos_id) == (pad, eos)

    batch = stage2.batch(np.arange(4))
    assert batch["images"].shape == (4, 3, 32, 32) and batch["images"].dtype == np.float32
    processor = AutoImageProcessor.from_pretrained(assets["vision"])
    first = Image.open(assets["data"] / "images" / assets["train"][0][0]).convert("RGB")
    np.testing.assert_allclose(batch["images"][0], processor(images=[first], return_tensors="np")["pixel_values"][0], atol=1e-5)
    question = tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
    for row in range(4):
        color = assets["train"][row][1]
        q = batch["questions"][row][batch["question_mask"][row] == 1]
        assert q.tolist() == question, "the first human turn without <image>"
        real = batch["answers"][row][batch["answer_mask"][row] == 1]
        trained = batch["answers"][row][(batch["loss_mask"][row] == 1)]
        assert _decode(tokenizer, real) == f"{color}<eos>Describe the imagea {color} square<eos>"
        assert _decode(tokenizer, trained) == f"{color}<eos>a {color} square<eos>", "gpt turns only"
    assert batch["image_mask"].tolist() == [1, 1, 1, 1] and batch["heads"].shape[1] == 1 and not batch["head_mask"].any()

    one = stage1.batch(np.array([0]))  # plain: no question, the caption + <eos>, all trained
    assert not one["question_mask"].any()
    assert _decode(tokenizer, one["answers"][0][one["loss_mask"][0] == 1]) == f"{assets['train'][0][1]}<eos>"
    text = stage2.batch(np.array([48]))  # the text-only record: trained as text, its image masked
    assert text["image_mask"].tolist() == [0] and not text["images"].any()
    assert _decode(tokenizer, text["answers"][0][text["loss_mask"][0] == 1]) == "red<eos>"

    ev = evals[0].batch(np.arange(3))
    assert ev["answers"].shape[1] == 1 and not ev["answer_mask"].any(), "eval batches carry the prompt only"
    references, options = evals[0].scoring()
    assert references[:3] == [[c] for _, c in assets["eval"][:3]] and options[0] == []


def test_chat_template_places_the_image_and_masks_human_turns(assets, monkeypatch, tmp_path):
    """A chat checkpoint: its template around every turn, the image's tokens where <image>
    stood (the start of the first human turn), the loss on exactly the assistant turns and
    their end-of-turn tokens; an eval set's suffix ends its question inside the template."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENSCALE_CACHE", str(tmp_path / "cache"))
    from transformers import AutoTokenizer

    from tokenscale.workers.train import load_splits

    raw = llava_grid(assets)
    raw["llms"] = [{"name": "qwen-tiny-chat", "path": str(assets["chat_llm"])}]
    raw["data"]["llava"]["eval"][0]["prompt_suffix"] = "Describe the image"
    (_, stage2), evals = load_splits(parse_grid(raw).trials()[0])
    tokenizer = AutoTokenizer.from_pretrained(assets["chat_llm"])
    assert stage2.eos_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    batch = stage2.batch(np.array([0]))
    color = assets["train"][0][1]

    def part(ids, mask) -> str:
        return _decode(tokenizer, ids[0][mask[0] == 1])

    assert part(batch["heads"], batch["head_mask"]) == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    assert part(batch["questions"], batch["question_mask"]) == f"\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    assert part(batch["answers"], batch["loss_mask"]) == f"{color}<|im_end|>\na {color} square<|im_end|>\n"
    untrained = batch["answer_mask"] * (1 - batch["loss_mask"])
    assert part(batch["answers"], untrained) == "<|im_start|>user\nDescribe the image<|im_end|>\n<|im_start|>assistant\n"
    ev = evals[0].batch(np.array([0]))
    assert part(ev["questions"], ev["question_mask"]) == f"\n{QUESTION}\nDescribe the image<|im_end|>\n<|im_start|>assistant\n"

    raw["data"]["llava"]["stage2"] = {"path": raw["data"]["llava"]["train"], "template": "chat"}
    raw["llms"] = [{"name": "qwen-tiny", "path": str(assets["llm"])}]
    with pytest.raises(ValueError, match="template 'chat' but the LLM's tokenizer has no chat template"):
        load_splits(parse_grid(raw).trials()[0])


def _captions(path, items) -> None:
    """Stage 1's kind of data: one caption per image, as in LLaVA's 558k pairs."""
    records = [
        {"id": f"c{i}", "image": name, "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image"}, {"from": "gpt", "value": f"a {color} square"}]}
        for i, (name, color) in enumerate(items)
    ]
    path.write_text(json.dumps(records))


def test_each_stage_trains_on_its_own_data_for_its_epochs(assets, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENSCALE_CACHE", str(tmp_path / "cache"))
    from transformers import AutoTokenizer

    from tokenscale.workers.train import MicroBatches, load_splits, stage_plan, stage_sources

    data = assets["data"]
    _captions(tmp_path / "captions.json", assets["train"][:40])
    trial = _trial(assets, train=None, stage1={"path": str(tmp_path / "captions.json"), "epochs": 2},
                   stage2={"path": str(data / "train.json"), "steps": 7})
    sources = stage_sources(trial, load_splits(trial)[0])
    assert (len(sources[1]), len(sources[2])) == (40, 49)
    plans = {n: stage_plan(trial, n, world_size=1, examples=len(sources[n])) for n in (1, 2)}
    assert plans[1].steps == 5 and plans[2].steps == 7  # ceil(2 x 40 / 16); as given
    from tokenscale.config import trial_training_flops

    assert trial_training_flops(trial) is None, "epochs: the examples are counted by the worker, not by plan"
    steps_only = _trial(assets, train=None, stage1={"path": str(tmp_path / "captions.json"), "steps": 3},
                        stage2={"path": str(data / "train.json"), "steps": 7})
    per_step = trial_training_flops(steps_only) / (3 * 16 + 7 * 16)
    assert per_step == pytest.approx(trial_training_flops(_trial(assets)) / (10 * 16 + 100 * 16))
    tokenizer = AutoTokenizer.from_pretrained(assets["llm"])
    first = MicroBatches(sources[1], trial, plans[1], 0, 1, 0)[0]
    captions = {tokenizer.decode(row[mask == 1]) for row, mask in zip(first["answers"], first["loss_mask"], strict=True)}
    assert all(c.startswith("a ") and c.endswith(" square<eos>") for c in captions), captions
    assert not first["question_mask"].any(), "stage 1 is LLaVA's plain template: the image, then the caption"
    second = MicroBatches(sources[2], trial, plans[2], 0, 1, 0)[0]
    assert second["question_mask"].any()


def test_two_workers_read_disjoint_shards_that_cover_the_epoch(assets, tmp_path, monkeypatch):
    """Each global batch split between the workers, no example twice in an epoch, every
    example once; each worker's reader returns exactly its records."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENSCALE_CACHE", str(tmp_path / "cache"))
    from tokenscale.workers.train import MicroBatches, load_splits, stage_plan

    raw = llava_grid(assets)
    raw["train"].update(micro_batch=4, global_batch=16)  # 2 workers x 4 x accumulation 2
    raw["data"]["llava"]["stage2"] = {  # 64 images + 1 text-only
        "path": str(assets["data"] / "eval.json"), "image_folder": str(assets["data"] / "eval_images"), "epochs": 1,
    }
    trial = parse_grid(raw).trials()[0]
    (_, stage2), _ = load_splits(trial)
    plan = stage_plan(trial, 2, world_size=2, examples=len(stage2))
    assert (len(stage2), plan.steps, plan.accumulation) == (65, 5, 2)
    shards = {rank: MicroBatches(stage2, trial, plan, rank, 2, 0) for rank in (0, 1)}
    from tokenscale.workers.train import global_batch_indices

    steps = {rank: [[int(i) for k in (2 * step, 2 * step + 1) for i in b.indices(k)] for step in range(plan.steps)]
             for rank, b in shards.items()}
    for step in range(plan.steps):
        mine, theirs = steps[0][step], steps[1][step]
        assert not set(mine) & set(theirs), "the workers' shares of a step are disjoint"
        assert sorted(mine + theirs) == sorted(global_batch_indices(trial.seed, 2, step, 65, 16).tolist())
    epoch = [i for step in range(4) for rank in (0, 1) for i in steps[rank][step]]  # 64 of the epoch's 65
    assert len(set(epoch)) == 64
    everything = {i for rank in (0, 1) for step in steps[rank] for i in step}
    assert everything == set(range(65)), "step 4 ends the epoch with its last example, then starts the next"
    ids = [stage2.records[i]["id"] for i in shards[1].indices(0)]
    batch = shards[1][0]
    assert len(batch["images"]) == 4 and len(ids) == 4


def test_loader_cuts_long_answers(assets, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENSCALE_CACHE", str(tmp_path / "cache"))
    from transformers import AutoTokenizer

    records = json.loads((assets["data"] / "train.json").read_text())[:3]
    for record in records:
        record["conversations"] = record["conversations"][:2]  # single-turn
    records[1]["conversations"][1]["value"] = "a red square"  # 3 words
    records[2]["conversations"][1]["value"] = "a red red red red square"  # cut
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(records))
    (_, stage2), _ = llava_data.load_sets(_trial(assets, train=str(path), max_answer_tokens=4))
    tokenizer = AutoTokenizer.from_pretrained(assets["llm"])
    eos = tokenizer.eos_token_id

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    batch = stage2.batch(np.arange(3))
    color, three, long = ids(assets["train"][0][1]), ids("a red square"), ids("a red red red red square")
    assert len(color) == 1 and len(three) == 3 and len(long) > 4
    assert batch["answers"].tolist() == [color + [eos] * 3, three + [eos], long[:4]]
    assert batch["answer_mask"].tolist() == [[1, 1, 0, 0], [1] * 4, [1] * 4] == batch["loss_mask"].tolist()


def test_image_preprocessing_without_a_processor_and_pad_to_square(assets, tmp_path):
    """No preprocessor_config.json: the config's image_size and CLIP's mean/std; the tiny
    tower (no vision path): vision.image_size, pixels in [0, 1]. `pad` first pads a wide
    image to a square of the mean colour (LLaVA-1.5), `crop` lets the processor crop it."""
    import shutil

    from PIL import Image
    from transformers.image_utils import OPENAI_CLIP_MEAN

    bare = tmp_path / "clip-bare"
    bare.mkdir()
    shutil.copy(assets["vision"] / "config.json", bare / "config.json")
    images = llava_data.open_images([str(assets["data"] / "images" / assets["train"][0][0])])
    trial = _trial(assets)
    pixels = llava_data.image_preprocessor(trial.vision.__class__(path=str(bare)))(images)
    assert pixels.shape == (1, 3, 32, 32)
    grey = (128 / 255 - OPENAI_CLIP_MEAN[0]) / 0.26862954
    assert pixels[0, 0, 0, 0] == pytest.approx(grey, abs=0.02)
    tiny = llava_data.image_preprocessor(trial.vision.__class__(image_size=16))(images)
    assert tiny.shape == (1, 3, 16, 16) and 0 <= tiny.min() and tiny.max() <= 1

    wide = Image.new("RGB", (64, 32), (255, 0, 0))  # red, twice as wide as high
    processed = {aspect: llava_data.image_preprocessor(trial.vision, aspect)([wide])[0] for aspect in ("pad", "crop")}
    red = processed["crop"][0]  # channel R of the centre crop of an all-red image: red everywhere
    assert np.allclose(red, red[0, 0])
    padded = processed["pad"][0]
    assert np.allclose(padded[16, :], red[16, :]), "the middle rows are the image"
    assert not np.allclose(padded[0, 0], red[0, 0]), "the top rows are the mean colour, not red"


def test_json_is_streamed_and_indexed(tmp_path, monkeypatch):
    """The JSON is scanned in chunks (an element across a chunk boundary, multi-byte text),
    unusable records are left out of the index, and a bad file says where it is bad."""
    monkeypatch.setenv("TOKENSCALE_CACHE", str(tmp_path / "cache"))
    records = [
        {"id": i, "image": f"{i}.png", "conversations": [{"from": "human", "value": f"q{i} é ✓"}, {"from": "gpt", "value": "a"}]}
        for i in range(50)
    ]
    records[7]["conversations"] = [{"from": "gpt", "value": "no question"}]  # unusable
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1))
    scanned = list(llava_data.scan_json_array(str(path), chunk_bytes=64))
    assert [value for _, _, value in scanned] == records
    raw = path.read_bytes()
    assert all(json.loads(raw[offset : offset + size]) == value for offset, size, value in scanned)
    index = llava_data.index_records(str(path))
    assert len(index) == 49 and 7 not in {json.loads(raw[o : o + n])["id"] for o, n, _ in index}
    reader = llava_data.Records(str(path))
    assert reader[7]["id"] == 8
    bad = tmp_path / "bad.json"
    bad.write_text('[{"a": 1}, {"b": ]')
    with pytest.raises(ValueError, match="invalid JSON near byte 11"):
        list(llava_data.scan_json_array(str(bad)))
    bad.write_text('{"not": "a list"}')
    with pytest.raises(ValueError, match="expected a JSON list"):
        list(llava_data.scan_json_array(str(bad)))


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
    _, (split,) = llava_data.load_sets(trial)
    _, (local, _) = llava_data.load_sets(_trial(assets))
    assert len(split) == 8
    remote_batch, local_batch = split.batch(np.arange(8)), local.batch(np.arange(8))
    for key in ("questions", "question_mask", "heads"):
        np.testing.assert_array_equal(remote_batch[key], local_batch[key])
    np.testing.assert_allclose(remote_batch["images"], local_batch["images"])
    assert split.scoring() == (local.scoring()[0][:8], local.scoring()[1][:8])
    images = tmp_path / "cache" / "s3" / "tokenscale" / "llava" / "img"
    assert sorted(p.name for p in images.iterdir()) == sorted(name for name, _ in assets["eval"][:8])


def test_a_trial_with_stage1_stage2_and_eval_data_on_s3(assets, s3_endpoint, monkeypatch, tmp_path):
    """A whole trial whose captions (stage 1), instruction data (stage 2) and eval set all
    live on s3:// (the loopback endpoint): it trains on both stages and learns the colours."""
    import boto3

    from tokenscale.workers.metrics import chance_floor
    from tokenscale.workers.train import single_process_group, train_and_evaluate

    monkeypatch.setenv("TOKENSCALE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    data = assets["data"]
    _captions(tmp_path / "captions.json", assets["train"])
    s3.upload_file(str(tmp_path / "captions.json"), "tokenscale", "llava/stage1.json")
    s3.upload_file(str(data / "train.json"), "tokenscale", "llava/stage2.json")
    s3.upload_file(str(data / "eval.json"), "tokenscale", "llava/eval.json")
    for name, _ in assets["train"]:
        s3.upload_file(str(data / "images" / name), "tokenscale", f"llava/train/{name}")
    for name, _ in assets["eval"]:
        s3.upload_file(str(data / "eval_images" / name), "tokenscale", f"llava/eval/{name}")
    raw = llava_grid(assets)
    raw["data"]["llava"] = {
        "stage1": {"path": "s3://tokenscale/llava/stage1.json", "image_folder": "s3://tokenscale/llava/train", "epochs": 2},
        "stage2": {"path": "s3://tokenscale/llava/stage2.json", "image_folder": "s3://tokenscale/llava/train"},
        "eval": [{"name": "colors", "task_family": "reasoning", "path": "s3://tokenscale/llava/eval.json",
                  "image_folder": "s3://tokenscale/llava/eval", "chance": 0.25}],
    }
    single_process_group("gloo")
    metrics = train_and_evaluate(parse_grid(raw).trials()[0])
    (row,) = metrics["rows"]
    assert row["benchmark"] == "colors" and row["n_examples"] == 64
    assert round(row["score"] * 64) >= chance_floor(64, 0.25, alpha=0.001), row
    assert np.isfinite(metrics["stage1_loss"]) and np.isfinite(metrics["stage2_loss"])


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
    # moved on purpose twice, as what a trial computes changed and old results must not be
    # reused: global batches, per-stage ZeRO, the epoch-ordered data stream and token_norm:
    # auto; then the generated benchmarks' version (7: recall's words grew the vocabulary)
    assert trial.config_hash == "29da1e52fbc78e0e"


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
    from tokenscale.workers.train import _batch, _build_model, evaluate, load_splits

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
    _, (split,) = load_splits(trial)
    suffix_ids = AutoTokenizer.from_pretrained(assets["llm"])("\n" + suffix, add_special_tokens=False)["input_ids"]
    assert split.batch(np.array([0]))["questions"][0, -len(suffix_ids):].tolist() == suffix_ids, "the suffix ends every question"
    references, options = split.scoring()
    assert split.metric == "vqa" and len(references[0]) == 10

    device, dtype = torch.device("cpu"), torch.float32
    model = _build_model(trial, device, dtype)
    (score,) = evaluate(model, [split], device, dtype)
    inputs = _batch(split, np.arange(len(split)), device, dtype)
    generated = model.generate(
        inputs["images"], inputs["questions"], inputs["question_mask"], 3, split.eos_id,
        heads=inputs["heads"], head_mask=inputs["head_mask"], image_mask=inputs["image_mask"],
    ).tolist()
    texts = [split.decode(ids[: ids.index(split.eos_id)] if split.eos_id in ids else ids) for ids in generated]
    expected, _ = score_set("vqa", texts, references)
    assert score.score == pytest.approx(expected)
    assert score.text_tokens_mean == inputs["question_mask"].sum(1).float().mean().item()
    with_color = ["red"] * len(split)  # a model that always says the first color: VQA's 0.3 steps
    assert score_set("vqa", with_color, references)[0] != score_set("exact", with_color, references)[0]
    assert 1.0 <= score.generated_tokens_mean <= 3.0


def test_kept_weights_are_scored_on_eval_sets_added_later(assets, tmp_path, monkeypatch, capsys):
    """train.keep_final stores the final trainable weights; `tokenscale eval` rebuilds the
    model from them and scores a new eval set without training, once: on the trial's own
    eval data it reproduces the trial's own score."""
    import yaml

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENSCALE_CACHE", str(tmp_path / "cache"))
    from tokenscale.cli import main
    from tokenscale.orchestrator.driver import save_grid
    from tokenscale.store import Store
    from tokenscale.workers.train import single_process_group, train_loop_per_worker

    raw = llava_grid(assets)
    raw["train"]["keep_final"] = True
    grid = parse_grid(raw)
    trial = grid.trials()[0]
    assert trial.config_hash == parse_grid(llava_grid(assets)).trials()[0].config_hash, "how, not what"
    store = Store.open(str(tmp_path / "store"))
    single_process_group("gloo")
    own = train_loop_per_worker(trial, report=lambda *a, **k: None, latest_checkpoint=lambda: None, rank=0,
                                world_size=1, store=store.uri)
    assert store.exists(store.weights_key(grid.name, trial.compressor, trial.config_hash))
    save_grid(grid, store)

    later = tmp_path / "later.yaml"
    data = assets["data"]
    later.write_text(yaml.safe_dump({"eval": [
        {"name": "colors-later", "task_family": "reasoning", "path": str(data / "eval.json"),
         "image_folder": str(data / "eval_images"), "chance": 0.25},
    ]}))
    assert main(["eval", grid.name, "--eval", str(later), "--store", store.uri]) == 0
    assert "1 new (trial, eval set) result(s); 0 already in the store" in capsys.readouterr().out
    rows = store.read_results(grid.name).to_pylist()
    by_benchmark = {r["benchmark"]: r for r in rows}
    assert set(by_benchmark) == {"colors", "colors-ocr", "colors-later"}
    assert by_benchmark["colors-later"]["score"] == by_benchmark["colors"]["score"] == own[0]["score"]
    assert by_benchmark["colors-later"]["config_hash"] == trial.config_hash
    key = store.eval_result_key(grid.name, trial.compressor, trial.config_hash, "colors-later")
    before = store.get_bytes(key)
    assert main(["eval", grid.name, "--eval", str(later), "--store", store.uri]) == 0  # exactly once
    assert "0 new (trial, eval set) result(s); 1 already in the store" in capsys.readouterr().out
    assert store.get_bytes(key) == before and len(store.read_results(grid.name)) == 3

    same_name = tmp_path / "same.yaml"
    same_name.write_text(later.read_text().replace("colors-later", "colors"))
    assert main(["eval", grid.name, "--eval", str(same_name), "--store", store.uri]) == 2
    assert "are the grid's own" in capsys.readouterr().err
    no_folder = tmp_path / "nofolder.yaml"
    no_folder.write_text(yaml.safe_dump({"eval": [{"name": "x", "task_family": "ocr", "path": str(data / "eval.json")}]}))
    assert main(["eval", grid.name, "--eval", str(no_folder), "--store", store.uri]) == 2
    assert "eval[0].image_folder: required here" in capsys.readouterr().err


def test_frozen_tower_features_are_built_once_into_the_store_split_across_workers(assets, tmp_path):
    """A frozen tower's features: the first trial (2 workers under torchrun) splits the
    missing shards between its ranks and writes them to <store>/features/; a second trial
    with the same tower, preprocessing and data (another V) builds none and reads them."""
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    from tokenscale.store import Store

    raw = llava_grid(assets)
    raw["visual_tokens"] = [1, 4]
    raw["train"].update(micro_batch=8, global_batch=16, stage2_steps=20)
    raw["vision"]["token_norm"] = "none"  # LLaVA's projector: no per-worker BatchNorm
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(raw))
    store = tmp_path / "store"
    env = worker_env(TOKENSCALE_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    runs = []
    for trial, workers in (("0", 2), ("1", 1)):
        run = subprocess.run(
            [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", str(workers),
             "-m", "tokenscale.workers", str(grid), "--trial", trial, "--store", str(store), "--format", "jsonl"],
            capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        runs.append(run)
    built = [final_metrics(runs[0].stderr, rank)["feature_shards_built"] for rank in (0, 1)]
    # three files, one shard each (train.json read by both stages counts once): 2 + 1
    assert sorted(built) == [1, 2], built
    assert final_metrics(runs[1].stderr, 0)["feature_shards_built"] == 0
    shards = Store.open(str(store)).list(str(store / "features"), ".npy")
    assert len(shards) == 3 and all(path.endswith("shard-000000.npy") for path in shards)
    rows = sorted(np.load(p, mmap_mode="r").shape[0] for p in shards)
    assert rows == [8, 49, 64]  # eval_ocr, train (48 images + the text-only record), eval
    features = np.load(next(p for p in shards if np.load(p, mmap_mode="r").shape[0] == 49))
    assert features.dtype == np.float16 and features.shape[1] == 16  # (32 / 8)^2 patches
    assert not features[48].any(), "the text-only record's row is zeros"


def test_padding_in_a_chat_batch_changes_nothing(assets, tmp_path, monkeypatch):
    """[head][visual][question][answer] with padding in the head, the question and the
    answer, and a text-only row beside: each example's logits are those it gets alone."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENSCALE_CACHE", str(tmp_path / "cache"))
    from tokenscale.workers.train import _build_model, _tensors, load_splits

    records = json.loads((assets["data"] / "train.json").read_text())
    records[1]["conversations"][0]["value"] = "<image>\nWhat color is the square? Describe the image"  # longer
    records[2]["conversations"] = records[2]["conversations"][:2]  # shorter answer
    (tmp_path / "mixed.json").write_text(json.dumps([records[0], records[1], records[2], records[-1]]))
    raw = llava_grid(assets, train=str(tmp_path / "mixed.json"))
    raw["llms"] = [{"name": "qwen-tiny-chat", "path": str(assets["chat_llm"])}]
    raw["vision"]["token_norm"] = "none"
    trial = parse_grid(raw).trials()[0]
    (_, stage2), _ = load_splits(trial)
    model = _build_model(trial, torch.device("cpu"), torch.float32).eval()
    together = stage2.batch(np.arange(4))
    assert together["image_mask"].tolist() == [1, 1, 1, 0]
    for mask in ("head_mask", "question_mask", "answer_mask"):  # padding in every part
        assert (together[mask] == 0).any(), mask
    with torch.no_grad():
        _, logits = model(**_tensors(together, torch.device("cpu"), torch.float32))
        for row in range(4):
            alone = stage2.batch(np.array([row]))
            _, single = model(**_tensors(alone, torch.device("cpu"), torch.float32))
            length = int(alone["answer_mask"].sum())
            torch.testing.assert_close(logits[row, :length], single[0, :length], atol=2e-5, rtol=1e-4)
