"""Prompt format, answer masking, truncation and batch layout."""

from __future__ import annotations

import pytest

from aimmerging.data.formatting import IGNORE_INDEX, Formatter, truncate_middle
from aimmerging.data.olora import Example
from aimmerging.models.loading import byte_tokenizer

EX = Example(id="x_1", input="Topic? Option: World, Sports.\nText: goal!\nAnswer:", output="Sports", task="x")


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def test_causal_sequence_is_prompt_then_space_answer_eos(tok):
    fmt = Formatter(tok, "causal", max_input_tokens=512)
    enc = fmt.encode(EX)
    prompt = tok(EX.input, add_special_tokens=True)["input_ids"]
    answer = tok(" Sports", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert enc.input_ids == prompt + answer
    assert enc.answer_len == len(answer) == 8  # " Sports" is 7 bytes, then EOS
    assert tok.decode(enc.input_ids[-enc.answer_len:-1]) == " Sports"


def test_labels_cover_only_answer_tokens_and_batches_are_left_padded(tok):
    fmt = Formatter(tok, "causal", max_input_tokens=512)
    short = Example(id="s", input="Hi?\nAnswer:", output="No", task="x")
    batch = fmt.collate([EX, short])
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == labels.shape == mask.shape
    n_short = len(fmt.encode(short).input_ids)
    pad = ids.shape[1] - n_short
    assert (ids[1, :pad] == fmt.pad_id).all() and (mask[1, :pad] == 0).all() and (mask[1, pad:] == 1).all()
    for row, ex in enumerate([EX, short]):
        n = fmt.encode(ex).answer_len
        assert (labels[row, -n:] == ids[row, -n:]).all()  # the answer (and EOS) carry the loss
        assert (labels[row, :-n] == IGNORE_INDEX).all()  # prompt and padding do not
    assert int(batch["answer_width"]) == max(fmt.encode(e).answer_len for e in [EX, short])


def test_seq2seq_inputs_right_padded_and_labels_are_answer_eos(tok):
    fmt = Formatter(tok, "seq2seq", max_input_tokens=512)
    enc = fmt.encode(EX)
    assert enc.labels == tok("Sports", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    batch = fmt.collate([EX, Example(id="s", input="Hi", output="No", task="x")])
    assert (batch["attention_mask"][1, :2] == 1).all() and (batch["attention_mask"][1, 2:] == 0).all()
    assert (batch["labels"][1, 3:] == IGNORE_INDEX).all()  # "No" + EOS, then -100


def test_truncation_keeps_head_and_tail():
    ids = list(range(100))
    out = truncate_middle(ids, 30, tail=12)
    assert out == list(range(18)) + list(range(88, 100))
    assert truncate_middle(ids, 200) == ids


def test_long_prompts_lose_their_middle_and_keep_answer_marker(tok):
    fmt = Formatter(tok, "causal", max_input_tokens=40)
    long = Example(id="l", input="Instruction. Option: a, b.\n" + "blah " * 100 + "\nAnswer:", output="a", task="x")
    enc = fmt.encode(long)
    prompt = enc.input_ids[:-enc.answer_len]
    assert len(prompt) == 40
    assert tok.decode(prompt).startswith("Instruction. Option: a, b.")
    assert tok.decode(prompt).endswith("\nAnswer:")


def test_answers_are_cut_at_max_target_tokens_but_keep_eos(tok):
    fmt = Formatter(tok, "causal", max_input_tokens=64, max_target_tokens=4)
    enc = fmt.encode(Example(id="a", input="Q:", output="abcdefgh", task="x"))
    assert enc.answer_len == 4 and enc.input_ids[-1] == tok.eos_token_id
    assert fmt.max_new_tokens(["ab", "abcdefgh"]) == 4


def test_generation_prompts_match_training_prompts(tok):
    fmt = Formatter(tok, "causal", max_input_tokens=512)
    batch = fmt.collate_prompts([EX])
    enc = fmt.encode(EX)
    assert batch["input_ids"][0].tolist() == enc.input_ids[:-enc.answer_len]


def test_chat_format_needs_a_chat_template(tok):
    from aimmerging.errors import ConfigError

    with pytest.raises(ConfigError, match="chat template"):
        Formatter(tok, "causal", prompt_format="chat")


def test_chat_format_wraps_the_input_as_a_user_turn(tok):
    tok = byte_tokenizer()
    tok.chat_template = "{% for m in messages %}[user]{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}[bot]{% endif %}"
    fmt = Formatter(tok, "causal", max_input_tokens=512, prompt_format="chat")
    enc = fmt.encode(EX)
    prompt = enc.input_ids[:-enc.answer_len]
    assert tok.decode(prompt) == "[user]" + EX.input + "[bot]"
    assert tok.decode(enc.input_ids[-enc.answer_len:-1]) == "Sports"  # no leading space in chat format
