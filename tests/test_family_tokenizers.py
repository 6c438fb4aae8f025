"""The families' tokenizers and chat templates against transformers' own, on stand-ins built the published way
(tests/family_files.py)."""

import json

import pytest

from gptjax.chat import GPT2_CHAT, ChatFormat, load_chat_format, template_switches
from gptjax.tokenizer import LLAMA3_N_SPECIALS, HFEncoding, _byte_of_char, load_tokenizer
from tests.family_files import DATA, LLAMA_RANKS, write_llama_tiktoken, write_qwen_tokenizer

transformers = pytest.importorskip("transformers")
TEXTS = [
    "Hello  world!\n\n naïve café 日本 😀 12345",
    "I HAD always thought Jack Gisburn rather a cheap genius--though a good fellow enough",
    "<|im_start|>user\nhi<|im_end|> and <think>x</think>  \t\n",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat's 2+2?<|eot_id|>",
    "e\u0301 (a decomposed é), tabs\t\tand trailing spaces   ",
    "In 2024, 1234567 people SAID IT'S 100000 \n\n  x",  # digits in threes (Llama) or ones (Qwen)
]
CHATS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who painted it?"},
     {"role": "assistant", "content": "<think>\nhm\n</think>\n\nJack Gisburn."}, {"role": "user", "content": "Why?"}],
]


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3-tokenizer")
    write_qwen_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama3-tokenizer")
    write_llama_tiktoken(folder)
    return folder


@pytest.fixture(scope="module")
def llama_reference(llama_folder):
    """transformers' tokenizer for the same ranks and special tokens (its TikTokenConverter, which builds the
    tokenizer.json Meta's Hugging Face repositories hold), with Llama 3.2 Instruct's template."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    encoding = load_tokenizer(llama_folder)
    specials = sorted(encoding.special_tokens_set, key=encoding.encode_single_token)
    backend = TikTokenConverter(str(llama_folder / "original" / "tokenizer.model"),
                                extra_special_tokens=specials).converted()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   chat_template=(DATA / "llama-3.2-instruct.jinja").read_text())


def test_byte_alphabet_is_gpt2s():
    from gguf.vocab import bytes_to_unicode

    assert _byte_of_char() == {c: b for b, c in bytes_to_unicode().items()}


def test_qwen_tokenizer_json_encodes_and_decodes_as_transformers(qwen_folder):
    hf = transformers.AutoTokenizer.from_pretrained(qwen_folder)
    encoding = load_tokenizer(qwen_folder)
    assert isinstance(encoding, HFEncoding) and encoding.n_vocab == len(hf)
    for text in TEXTS:
        ids = encoding.encode(text, allowed_special="all")
        assert ids == hf.encode(text, add_special_tokens=False), text
        assert encoding.decode(ids) == hf.decode(ids)
        assert encoding.decode_bytes(ids).decode() == hf.decode(ids)
        # Without allowed specials, tiktoken's rule: their text is text.
        ordinary = encoding.encode_ordinary(text)
        assert not set(ordinary) & {hf.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>")}
        assert encoding.decode(ordinary) == hf.decode(hf.encode(text, add_special_tokens=False))
    im_end = hf.convert_tokens_to_ids("<|im_end|>")
    assert encoding.encode("a<|im_end|>", allowed_special={"<|im_end|>", "<|begin_of_text|>"})[-1] == im_end
    # A token that is part of a character: its bytes, which streaming holds back until the character is whole.
    emoji = encoding.encode_ordinary("😀")
    assert b"".join(encoding.decode_single_token_bytes(t) for t in emoji) == "😀".encode()


@pytest.mark.parametrize("thinking", [False, True])
def test_qwen_chat_template_renders_as_transformers(qwen_folder, thinking):
    hf = transformers.AutoTokenizer.from_pretrained(qwen_folder)
    encoding = load_tokenizer(qwen_folder)
    chat = load_chat_format(qwen_folder, encoding)
    for messages in CHATS:
        text = chat.render(messages, enable_thinking=thinking)
        assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                              enable_thinking=thinking)
        assert encoding.encode(text, allowed_special="all") == hf.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=True, enable_thinking=thinking, return_dict=False)
    assert chat.stop_ids == {hf.convert_tokens_to_ids("<|im_end|>"), hf.convert_tokens_to_ids("<|endoftext|>")}
    assert chat.stop == ()


def test_llama_tiktoken_model_encodes_as_transformers(llama_folder, llama_reference):
    encoding = load_tokenizer(llama_folder)
    assert encoding.n_vocab == LLAMA_RANKS + LLAMA3_N_SPECIALS == len(llama_reference)
    assert encoding.encode("<|begin_of_text|>", allowed_special="all") == [LLAMA_RANKS]
    # Meta's names at Meta's ids (transformers' Llama 3.2 converter writes the same into tokenizer.json)
    for name, offset in (("<|finetune_right_pad_id|>", 4), ("<|eom_id|>", 8), ("<|eot_id|>", 9),
                         ("<|python_tag|>", 10), ("<|reserved_special_token_2|>", 11),
                         ("<|reserved_special_token_246|>", 255)):
        assert encoding.encode_single_token(name) == LLAMA_RANKS + offset, name
    for text in TEXTS:
        ids = encoding.encode(text, allowed_special="all")
        assert ids == llama_reference.encode(text, add_special_tokens=False), text
        assert encoding.decode(ids) == llama_reference.decode(ids)


def test_llama_tokenizer_json_reads_as_its_tiktoken_model(llama_folder, llama_reference, tmp_path):
    """A folder transformers wrote (tokenizer.json, no original/) tokenizes as Meta's tokenizer.model."""
    llama_reference.save_pretrained(tmp_path)
    from_json, from_model = load_tokenizer(tmp_path), load_tokenizer(llama_folder)
    assert isinstance(from_json, HFEncoding) and from_json.n_vocab == from_model.n_vocab
    for text in TEXTS:
        assert from_json.encode(text, allowed_special="all") == from_model.encode(text, allowed_special="all")
    chat = load_chat_format(tmp_path, from_json)
    messages = CHATS[1][:2] + [{"role": "assistant", "content": "Jack Gisburn."}, CHATS[1][-1]]
    for date in ({"date_string": "04 Dec 2026"}, {}):
        assert chat.render(messages, **date) == llama_reference.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **date)
    assert chat.stop_ids == {LLAMA_RANKS + 9}  # <|eot_id|>, the tokenizer's eos_token


def test_plain_text_chat_without_a_template(llama_folder, tmp_path):
    """GPT-2's format, and a base model's (no template): plain text, ending at its own end of sequence."""
    plain = ("Be brief.\n\nUser: Who painted it?\nAssistant: <think>\nhm\n</think>\n\nJack Gisburn.\nUser: Why?\n"
             "Assistant:")
    assert GPT2_CHAT.render(CHATS[1]) == plain
    assert GPT2_CHAT.stop == ("\nUser:",) and GPT2_CHAT.stop_ids == {50256}
    with pytest.raises(ValueError, match="names no end-of-sequence token"):
        load_chat_format(llama_folder, load_tokenizer(llama_folder))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": LLAMA_RANKS + 1}))
    base = load_chat_format(tmp_path, load_tokenizer(llama_folder))
    assert base.render(CHATS[1]) == plain and base.stop == ("\nUser:",) and base.stop_ids == {LLAMA_RANKS + 1}


def test_template_switches_are_the_known_ones_a_template_reads():
    assert template_switches(ChatFormat((DATA / "qwen3-0.6b.jinja").read_text())) == ["enable_thinking"]
    assert template_switches(ChatFormat((DATA / "llama-3.2-instruct.jinja").read_text())) == []  # date_string: no switch
    assert template_switches(GPT2_CHAT) == []
    # Named in a comment or a string is not read; set before it is read is not the caller's.
    assert template_switches(ChatFormat("{# enable_thinking #}{{ 'enable_thinking' }}{{ messages }}")) == []
    assert template_switches(ChatFormat("{% set enable_thinking = true %}{{ enable_thinking }}")) == []


def test_folder_without_a_tokenizer_says_so(tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path} has no tokenizer.json or Llama 3 tokenizer.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"decoder": {"type": "Metaspace"}, "model": {}}))
    with pytest.raises(ValueError, match="not a byte-level BPE tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{")
    with pytest.raises(ValueError, match="cannot read .*tokenizer_config.json"):
        load_chat_format(tmp_path, None)


def test_sentencepiece_tokenizer_model_is_not_taken_for_tiktoken(tmp_path, qwen_folder):
    """Llama 2's tokenizer.model is SentencePiece's protobuf: the folder's tokenizer.json wins."""
    (tmp_path / "tokenizer.model").write_bytes(b"\n\x0e\n\x05<unk>\x15\x00\x00\x00\x00\x18\x02")
    (tmp_path / "tokenizer.json").write_bytes((qwen_folder / "tokenizer.json").read_bytes())
    assert isinstance(load_tokenizer(tmp_path), HFEncoding)
