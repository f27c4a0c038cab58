"""Data as users bring it: the standard chat layout (content parts, an images list column), several images
per row, multi-turn rows, text rows in a VLM set, and what is wrong with a bad row. Encoding runs with each
architecture's own processor, loaded from a directory saved the way transformers saves one."""

from __future__ import annotations

import base64
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import RAYFT

from jobs.chat import conversation
from jobs.data import DataError, check_row, check_rows, collate, encode_row, encode_rows, measure
from jobs.model import load_processor
from orchestrator import tinymodels
from orchestrator.architectures import for_model_dir
from orchestrator.config import DataConfig

CHAT = {"messages": "messages", "images": "images"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, tuple[Path, object]]:
    """Each VLM family saved by save_pretrained (Qwen2-VL's processor config as stock transformers 5 writes
    it), with the processor training loads from it."""
    out = {}
    for name in ("llava", "idefics3", "qwen2_vl", "paligemma"):
        path = tinymodels.TINY_VLMS[name](tmp_path_factory.mktemp(name))
        out[name] = (path, load_processor(str(path), for_model_dir(path)))
    return out


def shapes(n: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    return [tinymodels.draw_shape(c, rng.choice(tinymodels.SHAPES), rng) for c in list(tinymodels.COLOURS)[:n]]


def user(*parts) -> dict:
    return {"role": "user", "content": [{"type": "image"} if p is None else {"type": "text", "text": p} for p in parts]}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


Q = tinymodels.QUESTIONS["english"]


def test_hf_chat_layout_encodes_exactly_like_prompt_answer(tiny, tmp_path):
    """Content parts + an images list column, as HF datasets writes them, give the same tokens, labels and
    pixels as the prompt/answer layout of the same rows."""
    path, processor = tiny["llava"]
    plain = tinymodels.colour_rows(6, seed=3)
    chat_file = tinymodels.write_chat_parquet([tinymodels.as_chat(r) for r in plain], tmp_path / "chat.parquet")
    plain_file = tinymodels.write_parquet(plain, tmp_path / "plain.parquet")
    cfg = DataConfig(train=str(chat_file), **CHAT)
    assert check_rows(chat_file, cfg, True) == 6
    chat, _ = encode_rows(chat_file, cfg, processor, True)
    ref, _ = encode_rows(plain_file, DataConfig(train=str(plain_file)), processor, True)
    for a, b in zip(chat, ref, strict=True):
        assert a.input_ids.tolist() == b.input_ids.tolist() and a.labels.tolist() == b.labels.tolist()
        assert torch.equal(a.extras["pixel_values"], b.extras["pixel_values"])


def test_images_in_the_parts_themselves(tiny, tmp_path):
    """An image part may carry its image: bytes, a path relative to the data file, a data: URI, OpenAI's image_url."""
    _, processor = tiny["llava"]
    png = shapes(1)[0]
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(png)
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    cells = [{"type": "image", "image": png}, {"type": "image", "path": "imgs/a.png"}, {"type": "image", "url": uri}, {"type": "image_url", "image_url": {"url": uri}}]
    cfg = DataConfig(train=str(tmp_path / "x.jsonl"), messages="messages")
    encoded = []
    for cell in cells:
        row = {"messages": [{"role": "user", "content": [cell, {"type": "text", "text": Q}]}, assistant("red")]}
        assert check_row(row, cfg, True, tmp_path / "x.jsonl")[0] == []
        encoded.append(encode_row(row, 0, cfg, processor, True, tmp_path / "x.jsonl"))
    for e in encoded[1:]:
        assert torch.equal(e.extras["pixel_values"], encoded[0].extras["pixel_values"])
        assert e.input_ids.tolist() == encoded[0].input_ids.tolist()


@pytest.mark.parametrize("name", ["llava", "idefics3", "qwen2_vl"])
def test_two_images_reach_the_processor_in_order(tiny, name, tmp_path):
    """A row with two images, one in each of two user turns: each image's tokens sit in its own turn and
    its pixels come in the row's order, the same pixels as each image alone."""
    _, processor = tiny[name]
    a, b = shapes(2)
    cfg = DataConfig(train=str(tmp_path / "x.parquet"), **CHAT)
    data_file = tmp_path / "x.parquet"

    def row(images, turns=2):
        messages = [user(None, Q), assistant("red")] + ([user(None, Q), assistant("blue")] if turns == 2 else [])
        return {"messages": messages if turns == 2 else [user(None, None, Q), assistant("red")], "images": [{"bytes": x, "path": None} for x in images]}

    pixels = "pixel_values"
    one_a, one_b = (encode_row({"messages": [user(None, Q), assistant("red")], "images": [{"bytes": x}]}, 0, cfg, processor, True, data_file) for x in (a, b))
    both = encode_row(row([a, b]), 0, cfg, processor, True, data_file)
    problems, decoded = check_row(row([a, b]), cfg, True, data_file)
    assert not problems and measure(row([a, b]), cfg, processor, True, decoded) == len(both.input_ids)  # the validation pass's length is exact
    swapped = encode_row(row([b, a]), 0, cfg, processor, True, data_file)
    dim = 1 if name == "idefics3" else 0  # Idefics3: (1, images, C, H, W)
    assert torch.equal(both.extras[pixels], torch.cat([one_a.extras[pixels], one_b.extras[pixels]], dim=dim))
    assert torch.equal(swapped.extras[pixels], torch.cat([one_b.extras[pixels], one_a.extras[pixels]], dim=dim))
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    per_image = int((one_a.input_ids == image_token).sum())
    assert int((both.input_ids == image_token).sum()) == 2 * per_image
    # both images in one turn: the same pixels, in order
    same_turn = encode_row(row([a, b], turns=1), 0, cfg, processor, True, data_file)
    assert torch.equal(same_turn.extras[pixels], both.extras[pixels])
    # the model takes the batch: two-image, one-image and text rows together
    text_row = encode_row({"messages": [{"role": "user", "content": Q}, {"role": "assistant", "content": "red"}], "images": []}, 0, cfg, processor, True, data_file)
    assert int((text_row.input_ids == image_token).sum()) == 0 and pixels not in text_row.extras
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny[name][0])
    batch = collate([text_row, both, one_a], processor.tokenizer.pad_token_id)
    labels = batch.pop("labels")
    assert torch.isfinite(model(**batch, labels=labels).loss)


def test_an_architecture_with_one_image_per_row_refuses_two(tiny, tmp_path):
    path, _ = tiny["paligemma"]
    a, b = shapes(2)
    cfg = DataConfig(train=str(tmp_path / "x.parquet"), **CHAT)
    row = {"messages": [user(None, None, Q), assistant("red")], "images": [{"bytes": a}, {"bytes": b}]}
    problems, _ = check_row(row, cfg, True, tmp_path / "x.parquet", for_model_dir(path).max_images)
    assert [p.what for p in problems] == ["2 images, but the model takes at most 1 per row"] and problems[0].fix


def test_multi_turn_loss_on_every_answer_or_only_the_last(tiny, tmp_path):
    _, processor = tiny["qwen2_vl"]
    tok = processor.tokenizer
    a, b = shapes(2)
    messages = [{"role": "system", "content": "answer in french ."}, user(None, Q), assistant("red"), user(None, Q), assistant("blue")]
    row = {"messages": messages, "images": [{"bytes": a}, {"bytes": b}]}
    data_file = tmp_path / "x.parquet"
    every = encode_row(row, 0, DataConfig(train=str(data_file), **CHAT), processor, True, data_file)
    last = encode_row(row, 0, DataConfig(train=str(data_file), train_on="last_turn", **CHAT), processor, True, data_file)
    assert tok.decode(every.labels[every.labels != -100]).split() == ["red", "<|im_end|>", "blue", "<|im_end|>"]
    assert tok.decode(last.labels[last.labels != -100]).split() == ["blue", "<|im_end|>"]
    assert every.input_ids.tolist() == last.input_ids.tolist()  # the same tokens; only the loss differs
    # the tokens are the chat template's rendering of the whole conversation (system message included)
    conv = conversation(row, DataConfig(train=str(data_file), **CHAT), True)
    text = processor.apply_chat_template(conv.messages[:-1], add_generation_prompt=True, tokenize=False)
    prompt = processor(images=[[tinymodels_image(a), tinymodels_image(b)]], text=[text], return_tensors="pt")["input_ids"][0]
    answer = tok("blue", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert every.input_ids.tolist() == prompt.tolist() + answer
    assert "system answer in french" in tok.decode(every.input_ids)
    # mm_token_type_ids follow the tokens: 1 exactly on image tokens
    image_token = tok.convert_tokens_to_ids(processor.image_token)
    assert every.extras["mm_token_type_ids"].tolist() == (every.input_ids == image_token).long().tolist()


def tinymodels_image(png: bytes):
    import io

    from PIL import Image

    return Image.open(io.BytesIO(png)).convert("RGB")


BAD_ROWS = {
    "unknown role": ({"messages": [{"role": "human", "content": Q}, assistant("red")], "images": []}, "role 'human'", "role system, user or assistant"),
    "sharegpt": ({"messages": [{"from": "human", "value": Q}, assistant("red")], "images": []}, "role None", "from/value"),
    "no answer": ({"messages": [user(None, Q)], "images": [{"bytes": b"x"}]}, "the last message must be the assistant's answer", "end each conversation"),
    "empty answer": ({"messages": [user(None, Q), assistant(" ")], "images": [{"bytes": b"x"}]}, "empty answer", "give every assistant message text"),
    "count": ({"messages": [user(None, None, Q), assistant("red")], "images": [{"bytes": b"x"}]}, "2 image part(s) in the messages but 1 image(s)", "one image per"),
    "assistant image": ({"messages": [user(Q), {"role": "assistant", "content": [{"type": "image"}]}], "images": []}, "an assistant message holds an image", "user messages"),
    "video": ({"messages": [{"role": "user", "content": [{"type": "video"}]}, assistant("red")], "images": []}, "videos are not supported", "parts"),
    "remote": ({"messages": [{"role": "user", "content": [{"type": "image", "url": "https://x.org/a.png"}, {"type": "text", "text": Q}]}, assistant("red")]}, "remote URL", "download"),
    "undecodable": ({"messages": [user(None, Q), assistant("red")], "images": [{"bytes": b"not a png"}]}, "image does not decode", "re-encode"),
    "second undecodable": ({"messages": [user(None, None, Q), assistant("red")], "images": [{"bytes": None, "path": "a.png"}, {"bytes": b"no"}]}, "image 2 of 2 does not decode", "re-encode"),
}


@pytest.mark.parametrize("kind", list(BAD_ROWS))
def test_bad_chat_rows_say_what_and_the_fix(kind, tmp_path):
    row, what, fix = BAD_ROWS[kind]
    shapes_png = shapes(1)[0]
    (tmp_path / "a.png").write_bytes(shapes_png)
    cfg = DataConfig(train=str(tmp_path / "x.parquet"), messages="messages", images="images" if "images" in row else None)
    problems, _ = check_row(row, cfg, True, tmp_path / "x.parquet")
    assert len(problems) == 1, problems
    assert what in problems[0].what and fix in problems[0].fix


def test_text_model_refuses_image_parts_and_rows_name_file_and_row(tmp_path):
    rows = [{"messages": json.dumps([{"role": "user", "content": Q}, {"role": "assistant", "content": "red"}])},
            {"messages": json.dumps([user(None, Q), assistant("red")])}]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as e:
        check_rows(path, DataConfig(train=str(path), messages="messages"), needs_image=False)
    assert e.value.problems == [f"{path} row 1: the row has image parts, but the model reads text only\n    fix: remove the image parts, or fine-tune a vision-language model"]


# ---- what `rayft validate` and `rayft train` say before anything trains (real Ray: run inside scripts/netns.sh)


def bad_chat_job(world: Path, tmp_path: Path) -> Path:
    """A chat-layout job whose train file has one row of each bad kind and whose eval file is empty."""
    import yaml

    rows = [tinymodels.as_chat(r) for r in tinymodels.colour_rows(12, seed=2)]
    rows[1]["images"] = [{"bytes": b"not an image", "path": None}]
    rows[3]["messages"][1]["content"][0]["text"] = " "
    rows[5]["images"] = [{"bytes": None, "path": "missing.png"}]
    rows[7]["messages"][0]["content"].insert(0, {"type": "image", "text": None})
    rows[9]["messages"][0]["content"][1]["text"] = " ".join(["what"] * 80)
    train = tinymodels.write_chat_parquet(rows, tmp_path / "train.parquet")
    (tmp_path / "eval.jsonl").write_text("")
    job = {
        "name": "bad", "model": str(world / "init"), "method": "full", "output": str(tmp_path / "runs"),
        "data": {"train": str(train), "eval": str(tmp_path / "eval.jsonl"), "messages": "messages", "images": "images", "max_length": 64},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


EXPECTED = {
    1: "image does not decode",
    3: "empty answer",
    5: "image file not found",
    7: "2 image part(s) in the messages but 1 image(s) in column `images`",
    9: "longer than data.max_length=64",
}


def rayft(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([RAYFT, *args], capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_validate_and_train_report_every_bad_row_at_once_and_train_nothing(world, tmp_path):
    job = bad_chat_job(world, tmp_path)
    train_file = tmp_path / "train.parquet"
    for command in ("validate", "train"):
        proc = rayft(command, str(job))
        out = proc.stderr
        assert proc.returncode == 2, out[-3000:]
        assert "Traceback" not in out + proc.stdout
        assert "6 problem(s) found before training" in out, out
        for row, what in EXPECTED.items():
            line = next((ln for ln in out.splitlines() if f"{train_file} (data.train) row {row}:" in ln), "")
            assert what in line, (row, out)
        assert f"{tmp_path / 'eval.jsonl'} (data.eval)" in out
        assert out.count("fix: ") == 6, out
        runs = tmp_path / "runs"
        assert not runs.exists() or [p.name for p in runs.iterdir()] == [".rayft-data"], "a run directory was left behind"
    assert rayft("validate", str(job), "--no-data").returncode == 0  # the job file itself is fine


@pytest.mark.slow
def test_validate_checks_the_data_of_a_good_job_and_train_reuses_the_pass(world, tmp_path):
    import yaml

    job = yaml.safe_load(bad_chat_job(world, tmp_path).read_text())
    rows = [tinymodels.as_chat(r) for r in tinymodels.colour_rows(40, seed=2)]
    job["data"]["train"] = str(tinymodels.write_chat_parquet(rows, tmp_path / "good.parquet"))
    job["data"]["eval"] = None
    path = tmp_path / "good.yaml"
    path.write_text(yaml.safe_dump(job))
    proc = rayft("validate", str(path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data.train: 40 rows ok, longest 29 tokens (data.max_length 64)" in proc.stderr
    assert yaml.safe_load(proc.stdout)["data"]["images"] == "images"
    cache = tmp_path / "runs" / ".rayft-data"
    assert list(cache.glob("rows-good-*/index-*.npz")), "the validation pass's index is kept for the run"
    assert not (cache / "validate.log").exists(), "40 rows are checked in rayft's own process: no Ray started"
    missing = rayft("validate", str(path), "--set", "data.images=pictures")
    assert missing.returncode == 2 and "missing column `pictures`" in missing.stderr and "fix: set data.images to the right column" in missing.stderr


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_stock_qwen_vl_processors_load_without_torchvision_with_one_warning(tiny, family, tmp_path):
    """The tiny Qwen2-VL's processor_config.json is the stock one (Qwen2VLProcessor + a nested video
    processor; for Qwen2.5-VL the same files naming its classes): AutoProcessor refuses it without
    torchvision; rayft loads its image side, warning once."""
    import shutil

    path, _ = tiny["qwen2_vl"]
    if family == "qwen2_5_vl":
        path = Path(shutil.copytree(path, tmp_path / family))
        for name, key, value in (("config.json", "model_type", "qwen2_5_vl"), ("processor_config.json", "processor_class", "Qwen2_5_VLProcessor")):
            body = json.loads((path / name).read_text())
            (path / name).write_text(json.dumps({**body, key: value}))
    config = json.loads((path / "processor_config.json").read_text())
    assert config["processor_class"] in ("Qwen2VLProcessor", "Qwen2_5_VLProcessor") and "video_processor" in config
    code = f"""
import sys
from transformers import AutoProcessor
try:
    AutoProcessor.from_pretrained({str(path)!r})
    print("stock loaded")
except ImportError as e:
    print("stock refused:", "Torchvision" in str(e))
from jobs.model import load_processor
from orchestrator.architectures import for_model_dir
for _ in range(2):
    p = load_processor({str(path)!r}, for_model_dir({str(path)!r}))
print(type(p).__name__, hasattr(p, "image_processor"))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "stock refused: True" in proc.stdout and f"{config['processor_class']}ImageOnly True" in proc.stdout
    assert proc.stderr.count("warning: torchvision is not installed") == 1, proc.stderr


# ---- the chat layout trains (real Ray Train, in-process)

CHAT_RUNS = {  # architecture -> (method, epochs of 32 steps, overrides), from random init. Measured: llava 100%,
    # idefics3 99%, qwen2_vl (QLoRA FP4, 4 epochs) 70% (34% after 2 epochs); chance is 12.5%
    "llava": ("full", 2, {}),
    "idefics3": ("full", 2, {}),
    "qwen2_vl": ("qlora", 4, {"quantization": {"type": "fp4", "double_quant": False}, "lora": {"rank": 16, "alpha": 32, "dropout": 0.0}}),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CHAT_RUNS))
def test_chat_layout_trains_above_chance(name, tmp_path):
    """Chat rows with content parts and an images column, as HF datasets writes them, train each family to
    well above chance; Qwen2-VL from its stock processor config, QLoRA over an FP4 base. Each run starts
    and stops its own embedded Ray, as `rayft train` does (the session's in-process Ray, left up from here,
    made tests/test_cluster.py's submissions fail: "No available agent to submit job")."""
    from conftest import CHANCE
    from transformers import AutoModelForImageTextToText

    from orchestrator import launch
    from orchestrator.config import build_job

    method, epochs, overrides = CHAT_RUNS[name]
    raw = tinymodels.chat_colour_job(name, method, tmp_path, epochs, 3e-3 if method == "full" else 5e-3, **overrides)
    model = Path(raw["model"])
    job, _ = build_job(raw)
    outcome = launch.train(job, progress=False)
    accuracy = outcome.manifest["metrics"]["eval_accuracy"]
    assert accuracy > 3 * CHANCE, f"{name}: {accuracy:.1%} on the chat layout"
    AutoModelForImageTextToText.from_pretrained(outcome.model_dir)  # plain transformers loads the export
    exported = json.loads((outcome.model_dir / "processor_config.json").read_text())
    assert exported.get("processor_class") == json.loads((model / "processor_config.json").read_text()).get("processor_class")
