import hashlib

import numpy as np

from gptjax import get_tokenizer, text_to_token_ids, token_ids_to_text
from gptjax.tokenizer import asset_path, load_default_corpus


def test_known_ids():
    tok = get_tokenizer()
    assert tok.n_vocab == 50257
    assert tok.encode("Every effort moves you") == [6109, 3626, 6100, 345]
    assert tok.encode("Hello, I am") == [15496, 11, 314, 716]
    assert tok.encode("<|endoftext|>", allowed_special={"<|endoftext|>"}) == [50256]


def test_helpers_shape_and_roundtrip():
    ids = text_to_token_ids("Every effort moves you<|endoftext|>")
    assert ids.shape == (1, 5) and ids.dtype == np.int32
    assert np.asarray(ids)[0, -1] == 50256
    assert token_ids_to_text(ids) == "Every effort moves you<|endoftext|>"


def test_bundled_corpus():
    data = asset_path("the-verdict.txt").read_bytes()
    assert hashlib.sha256(data).hexdigest() == "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f"
    text = load_default_corpus()
    assert len(text) == 20479
    assert len(get_tokenizer().encode(text)) == 5145
