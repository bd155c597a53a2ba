from experts.tokenizer import ByteTokenizer


def test_encode_decode_round_trips_any_unicode_text():
    tok = ByteTokenizer()
    text = "naïve café — 東京 🚀\n\tend"
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_vocab_is_256_bytes_plus_specials_and_decode_drops_specials():
    tok = ByteTokenizer()
    assert tok.vocab_size == 256 + len(tok.specials)
    assert tok.decode([tok.bos_id, *tok.encode("hi"), tok.eos_id]) == "hi"


def test_fingerprint_is_stable_and_depends_on_the_specials():
    assert ByteTokenizer().fingerprint == ByteTokenizer().fingerprint
    assert ByteTokenizer().fingerprint != ByteTokenizer(("<|bos|>",)).fingerprint


def test_encode_bytes_and_encode_texts_agree_with_the_tokenizer():
    from experts.tokenizer import EOS_ID, VOCAB_SIZE, encode_bytes, encode_texts

    text = "naïve — ☃"
    assert encode_bytes(text).tolist() == ByteTokenizer().encode(text)
    assert encode_texts([text, "b"], EOS_ID).tolist() == ByteTokenizer().encode(text) + [EOS_ID, 98, EOS_ID]
    assert VOCAB_SIZE == ByteTokenizer().vocab_size == 259
