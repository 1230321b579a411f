"""An offline WordPiece tokenizer for BERT-family towers on the built-in shapes data.

``shapes_wordpiece()`` is a Hugging Face ``BertTokenizerFast`` (lower-cased, BERT's special
tokens ``[PAD]`` 0, ``[UNK]`` 1, ``[CLS]`` 2, ``[SEP]`` 3, ``[MASK]`` 4) whose vocabulary is every
word of the shapes captions (:class:`jaxtrain.data.shapes.CaptionTokenizer`), then every
printable ASCII character alone and as a ``##`` continuation: a caption word is one token, and
any other ASCII text (an instruction prefix such as ``"query: "``) still encodes, character by
character, never to ``[UNK]``. A text encodes as ``[CLS] pieces [SEP]``, as BERT's. Built in
memory from the package's own data (no file, no network); ``data.tokenizer = 'shapes-wordpiece'``
names it (:func:`jaxtrain.data.tokenizers.load_tokenizer`), and ``save_pretrained`` writes it
out with an exported model.
"""

from __future__ import annotations

import functools
import string
from typing import TYPE_CHECKING

from jaxtrain.data.shapes import SPECIAL_TOKENS, CaptionTokenizer

if TYPE_CHECKING:
    import transformers

NAME = "shapes-wordpiece"
SPECIALS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def vocabulary() -> list[str]:
    """The tokens in id order: specials, caption words, characters, ``##`` characters."""
    words = [w for w in CaptionTokenizer().vocab if w not in SPECIAL_TOKENS]
    chars = [c for c in string.ascii_lowercase + string.digits + string.punctuation]
    out = list(SPECIALS)
    for token in [*words, *chars, *(f"##{c}" for c in chars)]:
        if token not in out:
            out.append(token)
    return out


@functools.cache
def shapes_wordpiece() -> transformers.PreTrainedTokenizerFast:
    """The tokenizer (one shared object: copy it before changing its state)."""
    import transformers

    vocab = {token: i for i, token in enumerate(vocabulary())}
    tok = transformers.BertTokenizerFast(vocab=vocab, do_lower_case=True)
    tok.name_or_path = NAME
    return tok
