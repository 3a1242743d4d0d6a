"""What a new user meets first (issue 33): each data path encodes the prompt and answer a user
expects (CSV with newlines, JSONL, chat ``messages`` in both prompt formats), the Python API takes
the rows ``--data`` takes, a method of one's own imports from the current directory, and the usual
mistakes (Hugging Face option names, a method's flag without its method, warm-up past the run,
the ``seq`` baseline) get one-line hints; ``data validate`` shows the exact tokens."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

import aimmerging
from aimmerging.cli.main import main
from aimmerging.config import build_config, run_notes
from aimmerging.data.files import read_csv, read_examples, read_jsonl
from aimmerging.data.formatting import Formatter
from aimmerging.errors import ConfigError
from aimmerging.models.loading import byte_tokenizer, tiny_model

from helpers import tiny_args

# ChatML, as SmolLM2's template renders a conversation (without its default system turn)
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHAT_ROW = {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Capital of France?"},
                         {"role": "assistant", "content": "Paris"}]}
TEMPLATED = ("<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n"
             "<|im_start|>assistant\n")
LAMP = "Product: desk lamp (15 EUR)\nCategory code:"


@pytest.fixture()
def tok():
    return byte_tokenizer()


@pytest.fixture()
def chat_tok():
    t = byte_tokenizer()
    t.chat_template = CHATML
    return t


def pieces(tok, ids) -> list[str]:
    """The text of each token (the byte tokenizer: one character, or a special token)."""
    return [tok.decode([i]) for i in ids]


def encoded(tok, ex, prompt_format="plain") -> tuple[list[str], list[str]]:
    """(prompt tokens, answer tokens) of ``ex`` as a run trains on it, as token texts."""
    enc = Formatter(tok, "causal", 512, 64, prompt_format).encode(ex)
    n = len(enc.input_ids) - enc.answer_len
    return pieces(tok, enc.input_ids[:n]), pieces(tok, enc.input_ids[n:])


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:  # csv's own \r\n line ends, quoted newlines
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


# -- 1-3. each data path: the exact prompt and answer tokens ---------------------------------------------

def test_csv_field_with_newlines_keeps_them(tmp_path, tok):
    write_csv(tmp_path / "t.csv", [{"input": LAMP, "output": "L7"}, {"input": "Product: pen\r\nCategory code:",
                                                                       "output": "P1"}])
    lamp, pen = read_csv(tmp_path / "t.csv")
    assert lamp.input == LAMP and lamp.output == "L7"
    assert pen.input == "Product: pen\r\nCategory code:"  # a quoted \r\n is data too
    prompt, answer = encoded(tok, lamp)
    assert prompt == list(LAMP)  # "...EUR)", "\n", "Category..." : the newline is a token of the prompt
    assert answer == [" ", "L", "7", "</s>"]


def test_jsonl_and_csv_answers_follow_the_prompt_after_one_space(tmp_path, tok):
    row = {"input": "Q: 2 + 2?\nAnswer:", "output": "4"}
    from_jsonl = read_jsonl(write_jsonl(tmp_path / "t.jsonl", [row]))[0]
    from_csv = read_csv(write_csv(tmp_path / "t.csv", [row]))[0]
    for ex in (from_jsonl, from_csv):
        assert encoded(tok, ex) == (list("Q: 2 + 2?\nAnswer:"), [" ", "4", "</s>"])
    # a prompt that already ends in whitespace gets no second space
    spaced = read_jsonl(write_jsonl(tmp_path / "s.jsonl", [{"input": "Answer: ", "output": "4"}]))[0]
    assert encoded(tok, spaced)[1] == ["4", "</s>"]


def test_chat_rows_in_plain_format(tmp_path, tok, chat_tok):
    path = write_jsonl(tmp_path / "c.jsonl", [CHAT_ROW])
    # no chat template: the plain rendering, whose "assistant:" is followed by one space
    plain = read_examples(path, tokenizer=tok)[0]
    assert not plain.templated
    assert encoded(tok, plain) == (list("system: Be terse.\nuser: Capital of France?\nassistant:"),
                                   [" ", "P", "a", "r", "i", "s", "</s>"])
    # a chat template: its rendering, verbatim, and the answer right after the generation prompt's newline
    templated = read_examples(path, tokenizer=chat_tok)[0]
    assert templated.templated and templated.input == TEMPLATED
    prompt, answer = encoded(chat_tok, templated)
    assert "".join(prompt) == TEMPLATED and answer == ["P", "a", "r", "i", "s", "</s>"]


def test_chat_rows_in_chat_format_apply_the_template_once(tmp_path, chat_tok):
    ex = read_examples(write_jsonl(tmp_path / "c.jsonl", [CHAT_ROW]), tokenizer=chat_tok)[0]
    prompt, answer = encoded(chat_tok, ex, "chat")
    assert "".join(prompt) == TEMPLATED  # the system turn is a turn of its own, not inside a user turn
    assert "".join(prompt).count("<|im_start|>") == 3
    assert answer == ["P", "a", "r", "i", "s", "</s>"]
    # a plain input/output row in chat format: one user turn
    plain = aimmerging.Example("q", "Capital of France?", "Paris", "t")
    prompt, answer = encoded(chat_tok, plain, "chat")
    assert "".join(prompt) == "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n"
    assert answer == ["P", "a", "r", "i", "s", "</s>"]
    fmt = Formatter(chat_tok, "causal", 512, 64, "chat")
    assert fmt.prompt_text(ex) == TEMPLATED and fmt.prompt_text(plain) == "".join(prompt)


# -- 4. the Python API takes the rows --data takes ---------------------------------------------------------

def test_api_takes_the_rows_of_data_files(tmp_path, monkeypatch, caplog):
    from aimmerging.api import as_stream
    from aimmerging.data.files import load_stream_file

    monkeypatch.chdir(tmp_path)
    qa = [{"question": f"Is {i} even?\nAnswer:", "answer": "yes" if i % 2 == 0 else "no"} for i in range(6)]
    chat = [{"messages": [{"role": "user", "content": f"Is {i} odd?"}, {"role": "assistant", "content": "no" if i % 2 == 0 else "yes"}]}
            for i in range(6)]
    write_jsonl(tmp_path / "qa.jsonl", qa)
    write_jsonl(tmp_path / "chat.jsonl", chat)
    (tmp_path / "s.yaml").write_text("input_field: question\noutput_field: answer\ntasks:\n"
                                     "  qa: {train: qa.jsonl, test: qa.jsonl}\n  chat: {train: chat.jsonl, test: chat.jsonl}\n")
    rows = {"qa": {"train": qa, "test": qa}, "chat": {"train": chat, "test": chat}}
    from_files = load_stream_file(tmp_path / "s.yaml", tokenizer=byte_tokenizer())
    from_rows = as_stream(rows, input_field="question", output_field="answer", tokenizer=byte_tokenizer())
    for task in ("qa", "chat"):
        assert [(e.input, e.output) for e in from_rows.split(task, "train")] == \
               [(e.input, e.output) for e in from_files.split(task, "train")]
    assert from_rows.split("chat", "train")[1].input == "user: Is 1 odd?\nassistant:"

    caplog.set_level("WARNING", logger="aimmerging")
    result = aimmerging.run(rows, model="tiny-causal", input_field="question", output_field="answer", max_steps=1,
                            batch_size=2, micro_batch_size=2, max_input_tokens=64, eval_batch_size=8, threads=1)
    assert len(result.accuracy_matrix) == 2 and result.accuracy_matrix[1][1] is not None
    # with a chat template (a (model, tokenizer) pair), chat rows are rendered with it, once
    model, t = tiny_model("tiny-causal")
    t.chat_template = CHATML
    result = aimmerging.run({"chat": {"train": chat, "test": chat}}, model=(model, t), max_steps=1, batch_size=2,
                            micro_batch_size=2, eval_batch_size=8, threads=1, prompt_format="chat", warmup_steps=0)
    assert len(result.accuracy_matrix) == 1
    notes = [r.getMessage() for r in caplog.records]
    assert sum("warmup_steps (50) >= max_steps (1)" in n for n in notes) == 1  # the first run only
    assert sum(n.startswith("method seq fine-tunes on each task in turn and does nothing against forgetting")
               for n in notes) == 2


# -- 5. a method of one's own, from the current directory ------------------------------------------------------

USER_METHOD = '''
from dataclasses import dataclass

import aimmerging
from aimmerging.methods.seq import Sequential


@dataclass
class AnchorSettings:
    anchor_weight: float = aimmerging.option(1.0, "weight of the anchor")


class Anchor(Sequential):
    name = "anchor-from-cwd"
    Settings = AnchorSettings
'''


@pytest.fixture()
def user_module(tmp_path, monkeypatch):
    """``cwd_user_method.py`` in a fresh current directory (sys.path and sys.modules restored after)."""
    (tmp_path / "cwd_user_method.py").write_text(USER_METHOD)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    yield tmp_path
    sys.modules.pop("cwd_user_method", None)


def one_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[aimmerging]")]
    assert len(err) == 1, err
    return err[0]


def test_method_import_path_finds_the_current_directory(user_module, capsys):
    from aimmerging.methods import resolve_method

    cls = resolve_method("cwd_user_method:Anchor")
    assert cls.__name__ == "Anchor" and cls.__module__ == "cwd_user_method"
    cfg = build_config(None, {"method": "cwd_user_method:Anchor", "anchor_weight": "2.5"})
    assert cfg.settings.anchor_weight == 2.5
    # the flag of the method, given without the method: a hint naming the file that declares it
    err = one_error(capsys, ["run", "--anchor-weight", "2"])
    assert "unrecognized arguments: --anchor-weight 2" in err
    assert ("--anchor-weight looks like an option of a method in cwd_user_method.py: name that method with "
            "--method cwd_user_method:ClassName") in err


def test_method_flag_of_a_method_that_cannot_be_imported_says_why(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # a flag no registered method declares (tests/plugin_methods.py registers one with --pull-weight)
    err = one_error(capsys, ["run", "--method", "no_such_user_module:Cls", "--tug-weight", "2"])
    assert "--tug-weight may be an option of method 'no_such_user_module:Cls', which could not be imported" in err
    assert "cannot import module 'no_such_user_module'" in err


def test_method_from_the_current_directory_runs_by_cli(user_module, data_dir, capsys):
    out = user_module / "run"
    args = tiny_args(out, data_dir, method="cwd_user_method:Anchor", steps=1, anchor_weight=3.0)
    args[args.index("--tasks") + 1] = "dbpedia"
    assert main(args) == 0
    config = (out / "config.yaml").read_text()
    assert "method: cwd_user_method:Anchor" in config and "anchor_weight: 3.0" in config


# -- 6. hints for Hugging Face names, all-linear, warm-up, seq -------------------------------------------------

def test_hugging_face_names_get_a_hint(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rate: 0.001\n")
    assert main(["run", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown option 'learning_rate' (a Hugging Face name; aimmerging's is lr)" in err
    with pytest.raises(ConfigError, match=r"unknown option 'model_name_or_path' \(a Hugging Face name; aimmerging's is model\)"):
        build_config({"model_name_or_path": "x"})
    err = one_error(capsys, ["run", "--learning-rate", "0.1"])
    assert "unrecognized arguments: --learning-rate 0.1; --learning-rate is a Hugging Face name; aimmerging's is --lr" in err
    err = one_error(capsys, ["run", "--model-name-or-path", "x"])
    assert "--model-name-or-path is a Hugging Face name; aimmerging's is --model" in err


def test_lora_targets_all_linear_adapts_every_linear_layer_but_the_head():
    from aimmerging.models.lora import attach_lora

    assert build_config(None, {"lora_targets": "all-linear"}).lora_targets == ["all-linear"]
    model, _ = tiny_model("tiny-causal")
    peft_model = attach_lora(model, "causal", target_modules=["all-linear"])
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in peft_model.named_parameters() if "lora_A" in n}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not any("lm_head" in n and "lora" in n for n, _ in peft_model.named_parameters())


def test_warmup_past_the_run_and_seq_are_one_line_notes():
    notes = run_notes(build_config(None, {"max_steps": "20"}))
    assert notes == ["warmup_steps (50) >= max_steps (20): the learning rate never reaches lr (0.0003; at most 20/50 "
                     "of it); lower --warmup-steps",
                     "method seq fine-tunes on each task in turn and does nothing against forgetting (the baseline); "
                     "--method aimmerging, replay, ewc, ... (aimmerging methods) counter it"]
    assert run_notes(build_config(None, {"max_steps": "20", "warmup_steps": "5", "method": "replay"})) == []


# -- 7. data validate on a stream file; prediction files hold the prompt ------------------------------------------

def test_data_validate_shows_each_tasks_exact_prompt_and_answer_tokens(tmp_path, capsys):
    write_csv(tmp_path / "lamp.csv", [{"input": LAMP, "output": "L7"}, {"input": "Product: pen\nCategory code:",
                                                                          "output": "P1"}])
    write_jsonl(tmp_path / "chat.jsonl", [CHAT_ROW])
    (tmp_path / "s.yaml").write_text("tasks:\n  lamp: {train: lamp.csv, test: lamp.csv}\n  chat: {train: chat.jsonl}\n")
    assert main(["data", "validate", str(tmp_path / "s.yaml"), "--model", "tiny-causal"]) == 0
    out = capsys.readouterr().out
    assert "lamp           train       2  L7 1, P1 1" in out and "chat           train       1  Paris 1" in out
    lamp = out[out.index("example of lamp"):out.index("example of chat")]
    assert f"  prompt text: {LAMP!r}\n" in lamp
    assert "  answer text: ' L7' + EOS\n" in lamp
    assert "  answer tokens (4): 224 ' ', 47 'L', 26 '7', 2 '</s>'\n" in lamp
    assert "29 ':', 224 ' ', 71 'd', " in lamp and ", 12 ')', 202 '\\n', 38 'C', " in lamp  # "(15 EUR)\nCategory"
    chat = out[out.index("example of chat"):]
    assert "  prompt text: 'system: Be terse.\\nuser: Capital of France?\\nassistant:'\n" in chat
    assert "  answer tokens (7): 224 ' ', 51 'P', 68 'a', 85 'r', 76 'i', 86 's', 2 '</s>'\n" in chat
    assert out.rstrip().endswith("2 tasks, 0 problems, 0 warnings")


def test_prediction_files_hold_the_prompt(tmp_path, data_dir):
    out = tmp_path / "run"
    args = tiny_args(out, data_dir, steps=1)
    args[args.index("--tasks") + 1] = "dbpedia"
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "stages" / "00-dbpedia" / "predictions" / "dbpedia.jsonl").open()]
    from aimmerging.data.olora import read_task

    test = {e.id: e.input for e in read_task(data_dir, "test", "dbpedia")}
    assert rows and all(r["prompt"] == test[r["id"]] for r in rows)
    assert list(rows[0]) == ["id", "prompt", "gold", "prediction", "score"]
