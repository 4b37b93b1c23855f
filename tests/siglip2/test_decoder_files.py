"""The decoder beside final/: saved and read back bitwise, found from a run directory or its final/, and a damaged one
refused with a one-line error."""

from __future__ import annotations

import random

import pytest
import torch

from siglip.errors import UserError
from siglip.siglip2.boxes import DecoderVocabulary
from siglip.siglip2.decoder import DecoderConfig, LocCaDecoder
from siglip.siglip2.decoder_files import find_decoder, load_decoder, save_decoder


def saved(tmp_path):
    vocab = DecoderVocabulary(text_size=random.randint(10, 90), bins=random.choice([16, 256]), pad_id=0, eos_id=1)
    decoder = LocCaDecoder(DecoderConfig(vocab.size, 24, width=16, layers=1, heads=2, mlp=32, max_length=12))
    length = random.randint(2, 6)
    return decoder, vocab, length, save_decoder(decoder, vocab, length, tmp_path / "run" / "decoder")


def test_a_saved_decoder_reads_back_bitwise_with_its_vocabulary_and_text_length(tmp_path):
    (tmp_path / "run").mkdir()
    decoder, vocab, length, where = saved(tmp_path)
    back = load_decoder(where)
    assert back.vocab == vocab and back.text_length == length and back.decoder.config == decoder.config
    want, got = decoder.state_dict(), back.decoder.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[name], got[name]) for name in want)
    assert not back.decoder.training
    # Saving again replaces it whole.
    save_decoder(decoder, vocab, length, where)
    assert sorted(path.name for path in where.parent.iterdir()) == ["decoder"]


def test_the_decoder_is_found_from_the_run_or_its_final_and_nowhere_else(tmp_path):
    (tmp_path / "run" / "final").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    assert find_decoder(tmp_path / "run") is None
    *_, where = saved(tmp_path)
    assert find_decoder(tmp_path / "run") == where == find_decoder(tmp_path / "run" / "final")
    assert find_decoder(tmp_path / "elsewhere") is None


def test_a_damaged_decoder_is_refused_in_one_line(tmp_path):
    (tmp_path / "run").mkdir()
    *_, where = saved(tmp_path)
    (where / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="is not a decoder written by siglip train") as error:
        load_decoder(where)
    assert "\n" not in str(error.value)
